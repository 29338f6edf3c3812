"""AI feedback: scorers, preference sets sampled and labelled by a scorer, relabelling an existing set, prompts.
See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.feedback.pairing import PAIRINGS, pair_candidates
from lora_dpo.feedback.prefs import build_candidate_set, build_preference_set
from lora_dpo.feedback.prompts import digit_caption, digit_of, load_prompts
from lora_dpo.feedback.relabel import relabel_preference_set
from lora_dpo.feedback.scorers import Scorer, load_scorer

__all__ = [
    "PAIRINGS",
    "Scorer",
    "build_candidate_set",
    "build_preference_set",
    "digit_caption",
    "digit_of",
    "load_prompts",
    "load_scorer",
    "pair_candidates",
    "relabel_preference_set",
]
