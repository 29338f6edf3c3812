"""The models: one module per family (``families/``), loading, LoRA adapters and files, the policy and its
reference, tiny and real-size builders. See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.models.adapters import (
    ADAPTER_NAME,
    REFERENCE_ADAPTER,
    adapters_disabled,
    add_lora,
    lora_state_dict,
)
from lora_dpo.models.archs import ARCHES, build_components, build_tiny_pipeline, save_tiny_pipeline
from lora_dpo.models.families import (
    FAMILIES,
    Components,
    ModelFamily,
    family_for_index,
    family_of_pipeline,
    get_family,
    pipeline_class,
)
from lora_dpo.models.loading import (
    detect_family,
    encode_posterior,
    encode_prompts,
    load_components,
    training_target,
    unet_conditioning,
)
from lora_dpo.models.lora_files import (
    WEIGHT_NAME,
    check_adapter_fits_model,
    load_adapter,
    read_lora_file,
    resolve_lora_file,
)
from lora_dpo.models.policy import Policy, build_policy
from lora_dpo.models.pretrained import DTYPES, read_model_index, safetensors_only
from lora_dpo.models.tiny_flow import build_tiny_flow_pipeline, save_tiny_flow_pipeline

__all__ = [
    "ADAPTER_NAME",
    "ARCHES",
    "Components",
    "DTYPES",
    "FAMILIES",
    "ModelFamily",
    "Policy",
    "REFERENCE_ADAPTER",
    "WEIGHT_NAME",
    "adapters_disabled",
    "add_lora",
    "build_components",
    "build_policy",
    "build_tiny_flow_pipeline",
    "build_tiny_pipeline",
    "check_adapter_fits_model",
    "detect_family",
    "encode_posterior",
    "encode_prompts",
    "family_for_index",
    "family_of_pipeline",
    "get_family",
    "load_adapter",
    "load_components",
    "lora_state_dict",
    "pipeline_class",
    "read_lora_file",
    "read_model_index",
    "resolve_lora_file",
    "safetensors_only",
    "save_tiny_flow_pipeline",
    "save_tiny_pipeline",
    "training_target",
    "unet_conditioning",
]
