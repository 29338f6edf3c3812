"""The digits world (a small real text-to-image model and its AI feedback, built on the CPU) and ``lora-dpo demo``.
See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.world.build import WORLD_DIR, WorldConfig, build_world
from lora_dpo.world.demo import train_and_evaluate

__all__ = ["WORLD_DIR", "WorldConfig", "build_world", "train_and_evaluate"]
