"""``lora-dpo train RECIPE [section.key=value ...]``: train a recipe, then print where its adapter and metrics are.

The training stage loads through the package's lazy API (``lora_dpo.train``) only once the recipe and its overrides
have passed their checks: a typo in a key answers in about 2 s instead of the 8 s the stages' imports take.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import lora_dpo
from lora_dpo.config import RecipeConfig, load_config

# The exit code of a run stopped by a signal: 128 + the signal's number, as a shell reports it.
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/sd15/lora_dpo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")


def run_training(cfg: RecipeConfig) -> int:
    """Train ``cfg``; on the main process print the final metrics and the files written. Returns the exit code:
    0, or 130 / 143 when SIGINT / SIGTERM stopped the run (a checkpoint is saved; 1 for another signal)."""
    result = lora_dpo.train(cfg)  # the training stage loads here (lazy API), after the recipe passed its checks
    if not result.is_main_process:
        return EXIT_SIGNAL.get(result.interrupted, 1) if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted by {result.interrupted} at step {result.step}; checkpoint saved in "
              f"{result.run_dir / 'checkpoints'}; continue with train.resume_from=latest")
        return EXIT_SIGNAL.get(result.interrupted, 1)
    shown = {k: round(result.final_metrics[k], 4) for k in ("loss", "rewards/accuracies", "rewards/margins")
             if k in result.final_metrics}
    print(f"done: {result.step} steps, final {json.dumps(shown)}")
    if cfg.train.mode == "full":
        print(f"pipeline: {result.run_dir}  (DiffusionPipeline.from_pretrained('{result.run_dir}'))")
    else:
        print(f"adapter: {result.adapter_path}  (pipe.load_lora_weights('{result.run_dir}'))")
    print(f"metrics: {result.run_dir / 'metrics.jsonl'}  (tensorboard --logdir {result.run_dir / 'logs'})")
    return 0


def preflight(cfg: RecipeConfig, recipe: str | None) -> list[str]:
    """The checks of this machine and this model that come before any weight loads: the ``warning:`` / ``note:``
    lines to print (a short warmup, a resume that ignores output.overwrite, 8-bit AdamW without a GPU, a recipe
    written for another model family). Raises ConfigError for fp16 without a GPU or an option the model's family
    does not take, ModelLoadError for a model that cannot be read (:func:`lora_dpo.training.setup.check_device`,
    :func:`lora_dpo.training.setup.recipe_family`)."""
    setup = importlib.import_module("lora_dpo.training.setup")  # the training stage, after the recipe's own checks
    lines = [*cfg.notes(), *setup.check_device(cfg)]
    if cfg.model.pretrained_model_name_or_path:
        family = setup.recipe_family(cfg)  # the options the model's family takes, before any weights load
        lines.append(setup.family_warning(recipe, family.name))
    return [line for line in lines if line]


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    lines = preflight(cfg, args.recipe)
    if int(os.environ.get("RANK", "0")) == 0:  # once, not once per process
        for line in lines:
            print(line, file=sys.stderr)
    return run_training(cfg)
