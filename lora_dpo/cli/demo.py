"""``lora-dpo demo [--threads N] [section.key=value ...]``: train LoRA-DPO on the committed digits world, then
evaluate it against the base model (:func:`lora_dpo.world.demo.train_and_evaluate`)."""

from __future__ import annotations

import argparse

from lora_dpo.evaluation.report import format_summary
from lora_dpo.world.demo import DEMO_NUM_THREADS, train_and_evaluate


def _threads(value: str) -> int | None:
    """``--threads``: a count >= 1, or ``auto`` (torch's default, one per core)."""
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a thread count (an integer >= 1, or auto)") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count} threads: use an integer >= 1, or auto")
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_threads, default=DEMO_NUM_THREADS,
                        help=f"torch threads, or auto (one per core); default {DEMO_NUM_THREADS or 'auto'}: the "
                             "small model runs fastest on one, most of all beside another busy process")
    parser.add_argument("overrides", nargs="*", help="section.key=value")


def run(args: argparse.Namespace) -> int:
    result, report = train_and_evaluate(overrides=args.overrides, num_threads=args.threads)
    print(f"trained {result.step} steps: adapter {result.adapter_path}")
    print(format_summary(report))
    return 0
