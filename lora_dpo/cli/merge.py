"""``lora-dpo merge MODEL ADAPTER OUT``: fuse a LoRA into its base model and write a diffusers pipeline folder (or
the denoiser alone: the UNet, or the SD3 / FLUX transformer) that opens without the adapter
(:func:`lora_dpo.export.merge.merge_adapter`)."""

from __future__ import annotations

import argparse
import json

import lora_dpo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the base pipeline (hub id or folder) the adapter was trained on")
    parser.add_argument("adapter", help="a run folder or a LoRA .safetensors file (diffusers or kohya layout)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter strength (default 1.0, as trained)")
    parser.add_argument("--unet-only", action="store_true", help="write only the denoiser: the UNet (UNet2DConditionModel folder), or the SD3 / FLUX "
                             "transformer (SD3Transformer2DModel / FluxTransformer2DModel folder)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the saved weights (fusing is done in fp32)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None, help="the base's weight variant to read, e.g. fp16")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")


def run(args: argparse.Namespace) -> int:
    report = lora_dpo.merge_adapter(  # the export stage loads here (lazy API): argument errors answer at once
        args.model, args.adapter, args.out, scale=args.scale, unet_only=args.unet_only, dtype=args.dtype,
        revision=args.revision, variant=args.variant, overwrite=args.overwrite)
    print(json.dumps(report, indent=2))
    return 0
