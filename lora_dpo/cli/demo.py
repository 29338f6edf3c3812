"""``lora-dpo demo [section.key=value ...]``: train LoRA-DPO on the committed digits world, then evaluate it
against the base model (:func:`lora_dpo.world.demo.train_and_evaluate`)."""

from __future__ import annotations

import argparse

from lora_dpo.evaluation.report import format_summary
from lora_dpo.world.demo import train_and_evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="section.key=value")


def run(args: argparse.Namespace) -> int:
    result, report = train_and_evaluate(overrides=args.overrides)
    print(f"trained {result.step} steps: adapter {result.adapter_path}")
    print(format_summary(report))
    return 0
