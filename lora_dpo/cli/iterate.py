"""``lora-dpo iterate RECIPE [--rounds R] [section.key=value ...]``: online, iterative Diffusion-DPO in one folder
(:func:`lora_dpo.iterate.loop.iterate`); prints the table of rounds. Started again after a kill, it resumes."""

from __future__ import annotations

import argparse
import importlib
import sys

from lora_dpo.cli.train import EXIT_SIGNAL, preflight
from lora_dpo.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML with an iterate: section, e.g. recipes/digits/iterate.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the recipe's iterate.rounds)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. iterate.candidates=16")


def run(args: argparse.Namespace) -> int:
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: give at least 1 round")
    rounds = [f"iterate.rounds={args.rounds}"] if args.rounds is not None else []
    cfg = load_config(args.recipe, [*args.overrides, *rounds])
    for line in preflight(cfg, args.recipe):
        print(line, file=sys.stderr)
    loop = importlib.import_module("lora_dpo.iterate.loop")  # the stages load once the recipe passed its checks
    summary = importlib.import_module("lora_dpo.iterate.summary")
    result = loop.iterate(cfg)
    if result.interrupted:
        print(f"interrupted by {result.interrupted} in round {len(result.rounds) + 1}; run the same command again to "
              "resume it at its last checkpoint")
        return EXIT_SIGNAL.get(result.interrupted, 1)
    print(summary.format_rounds(result.rounds))
    print(f"adapter: {result.adapter_path}  (pipe.load_lora_weights('{result.run_dir}'))")
    print(f"table: {result.run_dir / summary.SUMMARY_FILE}   figure: {result.run_dir / summary.FIGURE_FILE}")
    return 0
