"""``lora-dpo generate MODEL PROMPT ... [--adapter PATH[:SCALE] ...]``: images from a base model plus adapters
(compel prompt syntax); PNGs with their parameters, and an adapters off / on grid
(:func:`lora_dpo.inference.generation.generate`).

The arguments are checked here, before the generation stage loads through the package's lazy API
(``lora_dpo.generate``): a bad ``--adapter`` scale, a missing adapter file, a model that is neither a folder nor a
hub id, a size that is not a multiple of 8 answer in about a second, without importing torch or diffusers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lora_dpo

# lora_dpo.inference.generation.SCHEDULER_NAMES, written out so that the parser needs no torch import (a test keeps
# the two equal).
SCHEDULER_NAMES = ("default", "ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpm++_2m",
                   "dpm++_2m_karras", "unipc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="diffusers pipeline folder or hub id (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1)")
    parser.add_argument("prompt", nargs="+",
                        help="one or more prompts, compel syntax: '(word)1.3', '(a, b).blend(.7, .3)' (SD3: plain "
                             "text, compel has no SD3 weighting)")
    parser.add_argument("--negative-prompt", default="",
                        help="FLUX.1 takes none (its guidance is distilled): refused there")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA (run folder or .safetensors) and its scale (default 1.0); repeat for several")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance scale (FLUX.1: the distilled guidance input, e.g. 3.5)")
    parser.add_argument("--scheduler", default="default", choices=SCHEDULER_NAMES,
                        help="sampler (SD3 / FLUX.1: default only, their flow-matching Euler sampler)")
    parser.add_argument("--height", type=int, default=None,
                        help="pixels (default: the model's; FLUX.1's pipeline default is 1024)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--out", default="samples", help="output folder (default samples/)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-grid", action="store_true", help="with adapters: skip the adapter-off images and grid")


def adapter_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` (scale 1.0 by default). An existing path is a path, whatever ``:`` it holds.

    Raises:
        ValueError: the text after the last ``:`` is not a number (``--adapter run:strong``).
        FileNotFoundError: no adapter at the path.
    """
    path, sep, scale = text.rpartition(":")
    if Path(text).expanduser().exists() or not sep:
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"--adapter {text}: scale '{scale}' is not a number; write PATH:SCALE, e.g. "
                         f"{path or 'adapters/run'}:0.8 (or PATH alone for 1.0)") from None
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"--adapter {text}: LoRA adapter {path} not found: pass a run folder or a "
                                ".safetensors file")
    return path, value


def check_arguments(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The checks that need no model: the adapters (:func:`adapter_arg`; a path without a scale must exist), the
    model (an existing folder or an ``org/name`` hub id), the image size and the step count. Returns the adapters as
    ``(path, scale)``.

    Raises:
        ValueError / FileNotFoundError: the first bad argument, named.
    """
    adapters = [adapter_arg(text) for text in args.adapter]
    for path, _ in adapters:
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"--adapter: LoRA adapter {path} not found: pass a run folder or a .safetensors "
                                    "file")
    model = str(args.model)
    if not Path(model).expanduser().exists() and (model.count("/") != 1 or model.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"model '{model}' is neither a folder (a relative path is read from the current "
                                f"directory, {Path.cwd()}) nor a hub id of the form org/name")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{name} {value} must be a positive multiple of 8, e.g. {max(8, round(value / 8) * 8)}")
    if args.steps <= 0:
        raise ValueError(f"--steps {args.steps} must be at least 1")
    return adapters


def run(args: argparse.Namespace) -> int:
    adapters = check_arguments(args)
    report = lora_dpo.generate(  # the generation stage loads here (lazy API), after the arguments passed their checks
        args.model, args.prompt, negative_prompt=args.negative_prompt, adapters=adapters,
        seeds=args.seeds, num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
        height=args.height, width=args.width, out_dir=args.out, device=args.device, dtype=args.dtype,
        grid=not args.no_grid,
    )
    print(f"{len(report['images'])} images in {args.out}" + (f", grid {report['grid']}" if report["grid"] else "")
          + f" ({report['timings']['seconds_per_image']:.2f} s per image)")
    return 0
