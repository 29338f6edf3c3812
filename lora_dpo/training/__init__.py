"""The training stage: micro-steps (noising, reference and policy errors, the loss table), the recipe and its
loop, checkpoints, optimizers, metrics and diagnostics, and building the latent cache. See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.training.cache_build import build_cache
from lora_dpo.training.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from lora_dpo.training.diagnostics import BothErrorsRising, timestep_bucket_sums
from lora_dpo.training.memory import current_memory_gb, peak_memory_gb, reset_peak_memory
from lora_dpo.training.optim import build_lr_scheduler, build_optimizer, check_optimizer_available
from lora_dpo.training.recipe import PreferenceRecipe, TrainResult, train
from lora_dpo.training.setup import check_recipe, setup_policy
from lora_dpo.training.steps import MICRO_STEPS, dpo_micro_step, kto_micro_step, noised_latents

__all__ = [
    "check_recipe",
    "BothErrorsRising",
    "MICRO_STEPS",
    "PreferenceRecipe",
    "TrainResult",
    "build_cache",
    "build_lr_scheduler",
    "build_optimizer",
    "check_optimizer_available",
    "current_memory_gb",
    "dpo_micro_step",
    "kto_micro_step",
    "list_checkpoints",
    "load_checkpoint",
    "noised_latents",
    "peak_memory_gb",
    "reset_peak_memory",
    "resolve_resume",
    "save_checkpoint",
    "setup_policy",
    "timestep_bucket_sums",
    "train",
]
