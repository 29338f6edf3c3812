"""``lora-dpo export ADAPTER --format diffusers|peft|kohya --out OUT``: write an adapter in the diffusers, PEFT or
kohya (AUTOMATIC1111 / ComfyUI) layout (:func:`lora_dpo.export.formats.export_adapter`)."""

from __future__ import annotations

import argparse

from lora_dpo.config import load_config
from lora_dpo.export.formats import FORMATS, export_adapter
from lora_dpo.models.loading import detect_family, read_model_index
from lora_dpo.models.lora_files import denoiser_config, resolve_lora_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="a run folder or its pytorch_lora_weights.safetensors")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder (kohya: a folder or a .safetensors file)")
    parser.add_argument("--base", default=None, help="the base model (default: the run's recipe.yaml)")


def run(args: argparse.Namespace) -> int:
    file = resolve_lora_file(args.adapter)
    base = args.base
    if base is None:
        recipe = file.parent / "recipe.yaml"
        if not recipe.is_file():
            raise ValueError(f"{file} is not in a lora-dpo run folder (no recipe.yaml): pass --base MODEL")
        base = load_config(recipe).model.pretrained_model_name_or_path
    family = detect_family(read_model_index(base))
    config = denoiser_config(base, family)  # unet/ or transformer/config.json: SDXL and FLUX kohya names need it
    out = export_adapter(file, args.out, args.format, family, config)
    print(f"{args.format} adapter for {base} ({family}): {out}")
    return 0
