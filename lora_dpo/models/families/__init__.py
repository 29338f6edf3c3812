"""The model families lora-dpo trains, one module each, and how to find a pipeline's family.

Adding a family: write a module with a :class:`~lora_dpo.models.families.base.ModelFamily` subclass (see the
protocol's docstrings; :mod:`.stable_diffusion` holds what the UNet families share) and register it below.
Nothing else in the kit compares family names.
"""

from __future__ import annotations

from typing import Any, Literal

from lora_dpo.errors import ModelLoadError
from lora_dpo.models.families.base import Components, ModelFamily, get_family, register
from lora_dpo.models.families.flux import Flux
from lora_dpo.models.families.sd3 import SD3
from lora_dpo.models.families.sd15 import SD15
from lora_dpo.models.families.sdxl import SDXL

FAMILIES = register(
    SD15(),
    SDXL(),
    SD3(),
    Flux(),
)
Family = Literal[tuple(FAMILIES)]  # the registered names (a Literal built from the registry; type checkers see str)


def family_for_index(model_index: dict[str, Any]) -> ModelFamily:
    """The family of a pipeline's ``model_index.json``: the one naming its ``_class_name``, else the one whose
    component layout it has (a pipeline class this kit does not list).

    Raises:
        ModelLoadError: no family fits (e.g. PixArt, Qwen-Image); the message names the class and the supported ones.
    """
    for family in FAMILIES.values():
        if family.recognises(model_index):
            return family
    for family in FAMILIES.values():
        if family.matches_layout(model_index):
            return family
    supported = ", ".join(f"{f.label} ({', '.join(sorted(f.pipeline_class_names))})" for f in FAMILIES.values())
    raise ModelLoadError(f"pipeline class '{model_index.get('_class_name', '')}' is not supported: lora-dpo trains "
                         f"{supported}")


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a loaded diffusers pipeline, from its class and its components.

    Raises:
        ModelLoadError: as :func:`family_for_index`.
    """
    return family_for_index({**dict(pipe.config), "_class_name": type(pipe).__name__})


def pipeline_class(family: str) -> type:
    """The diffusers pipeline class of a family name (its ``save_lora_weights`` / ``load_lora_weights`` /
    ``lora_state_dict`` / ``from_pretrained``). Raises ValueError for an unknown name."""
    return get_family(family).pipeline_class


__all__ = ["FAMILIES", "Components", "Family", "ModelFamily", "family_for_index", "family_of_pipeline",
           "get_family", "pipeline_class"]
