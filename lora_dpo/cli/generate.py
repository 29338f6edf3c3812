"""``lora-dpo generate MODEL PROMPT ... [--adapter PATH[:SCALE] ...]``: images from a base model plus adapters
(compel prompt syntax); PNGs with their parameters, and an adapters off / on grid
(:func:`lora_dpo.inference.generation.generate`)."""

from __future__ import annotations

import argparse

from lora_dpo.inference.generation import SCHEDULER_NAMES, generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="diffusers pipeline folder or hub id (SD1.5 or SDXL)")
    parser.add_argument("prompt", nargs="+",
                        help="one or more prompts, compel syntax: '(word)1.3', '(a, b).blend(.7, .3)'")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA (run folder or .safetensors) and its scale (default 1.0); repeat for several")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="default", choices=SCHEDULER_NAMES)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--out", default="samples", help="output folder (default samples/)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-grid", action="store_true", help="with adapters: skip the adapter-off images and grid")


def adapter_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` (scale 1.0 by default; a text after the last ``:`` that is not a number is part
    of the path)."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def run(args: argparse.Namespace) -> int:
    report = generate(
        args.model, args.prompt, negative_prompt=args.negative_prompt, adapters=[adapter_arg(a) for a in args.adapter],
        seeds=args.seeds, num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
        height=args.height, width=args.width, out_dir=args.out, device=args.device, dtype=args.dtype,
        grid=not args.no_grid,
    )
    print(f"{len(report['images'])} images in {args.out}" + (f", grid {report['grid']}" if report["grid"] else "")
          + f" ({report['timings']['seconds_per_image']:.2f} s per image)")
    return 0
