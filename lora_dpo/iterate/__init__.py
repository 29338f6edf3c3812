"""``lora-dpo iterate``: online, iterative Diffusion-DPO (sample, score, pair, train against the previous round,
evaluate; resumable). See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.iterate.loop import IterateResult, iterate
from lora_dpo.iterate.summary import format_rounds

__all__ = ["IterateResult", "format_rounds", "iterate"]
