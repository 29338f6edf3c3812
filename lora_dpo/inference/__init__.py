"""Sampling from a base model plus adapters: ``lora-dpo generate`` (compel weighting, PNG metadata) and the
grids. See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.inference.generation import SCHEDULER_NAMES, generate, prompt_embeddings
from lora_dpo.inference.grids import make_grid
from lora_dpo.inference.sampling import generate_images, load_pipeline

__all__ = [
    "SCHEDULER_NAMES",
    "generate",
    "generate_images",
    "load_pipeline",
    "make_grid",
    "prompt_embeddings",
]
