"""``lora-dpo validate RECIPE [section.key=value ...] [--no-model]``: check a recipe, its model folder or id, its
optimizer, its starting LoRA and its data (a file, a stream or a latent cache) without loading weights or training
(:func:`lora_dpo.training.setup.check_recipe`); ``--no-model`` leaves the model out (offline, or not downloaded yet).
Warnings (``warning: ...`` lines on stderr) name what is valid but likely not meant: a recipe written for another
model family, fp16 or 8-bit AdamW without a GPU (fp16 there is an error), a warmup longer than the run.

The stages load through the package's lazy API (``lora_dpo.check_recipe``) only after the recipe and its overrides
have passed their own checks, so a typo in a key answers in about 2 s instead of the 8 s the stages' imports take.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import lora_dpo
from lora_dpo.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/sd15/lora_dpo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    parser.add_argument("--no-model", action="store_true",
                        help="check the recipe and its data without the model (offline, or not downloaded yet)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    notes = cfg.notes()
    family, report = lora_dpo.check_recipe(cfg, with_model=not args.no_model)  # the stages load only now
    setup = importlib.import_module("lora_dpo.training.setup")  # already loaded by check_recipe
    notes += [*setup.check_device(cfg), *([setup.family_warning(args.recipe, family)] if family else [])]
    notes = [line for line in notes if line]
    for line in notes:
        print(line, file=sys.stderr)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    warned = sum(line.startswith("warning:") for line in notes)
    print(f"recipe OK: {args.recipe}" + (f" ({warned} warning{'s' * (warned > 1)}, above)" if warned else ""))
    print(f"  model: {cfg.model.pretrained_model_name_or_path} "
          + (f"({family})" if family else "(not checked: --no-model)"))
    print(f"  data:  {cfg.data.dataset}: {json.dumps(report)}")
    unit = cfg.loss.unit  # KTO: labeled images (a pair set gives two each)
    print(f"  effective batch: {cfg.train.batch_size} {unit} × {cfg.train.gradient_accumulation_steps} accumulation × "
          f"{world} processes = {cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world} {unit} per step")
    print(f"  mode: {cfg.train.mode}, loss {cfg.loss.describe()}, optimizer {cfg.optim.name}"
          + (f", starting from the LoRA {cfg.lora.init_from} (also the reference)" if cfg.lora.init_from else ""))
    print(f"  run folder: {cfg.run_dir}")
    return 0
