"""What a run leaves for other tools: the adapter (or full pipeline) with its recipe and model card, the same
adapter as PEFT or kohya files (``lora-dpo export``), and merged into the base weights. See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.export.artifacts import (
    export_policy,
    save_full_pipeline,
    save_lora_adapter,
    training_caption,
    write_model_card,
)
from lora_dpo.export.formats import FORMATS, export_adapter, kohya_module_name
from lora_dpo.export.merge import merge_adapter

__all__ = [
    "FORMATS",
    "export_adapter",
    "export_policy",
    "kohya_module_name",
    "merge_adapter",
    "save_full_pipeline",
    "save_lora_adapter",
    "training_caption",
    "write_model_card",
]
