"""lora-dpo: Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization",
CVPR 2024, arXiv 2311.12908) and its family of losses, with LoRA adapters, for diffusers pipelines.

The public API::

    from lora_dpo import load_config, train, evaluate
    result = train(load_config("recipes/digits/lora_dpo.yaml", ["train.max_steps=100"]))

The names load on first use (PEP 562 ``__getattr__``): ``import lora_dpo`` imports no stage, so the command line's
dispatcher and ``lora_dpo.config`` stay light. The stages and what each may import: ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib

# public name -> (module, attribute)
_API = {
    "train": ("lora_dpo.training.recipe", "train"),
    "check_recipe": ("lora_dpo.training.setup", "check_recipe"),
    "load_config": ("lora_dpo.config", "load_config"),
    "RecipeConfig": ("lora_dpo.config", "RecipeConfig"),
    "evaluate": ("lora_dpo.evaluation.run", "evaluate_run"),
    "iterate": ("lora_dpo.iterate.loop", "iterate"),
    "merge_adapter": ("lora_dpo.export.merge", "merge_adapter"),
    "export_adapter": ("lora_dpo.export.formats", "export_adapter"),
    "generate": ("lora_dpo.inference.generation", "generate"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lora_dpo' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
