"""``lora-dpo demo [--world NAME] [--threads N] [--rounds R] [section.key=value ...]``: train LoRA-DPO on a committed
digits world (``digits``, SD1.5 layout, the default; ``digits-sd3``, Flow-DPO on the SD3 layout), then evaluate it
against the base model (:func:`lora_dpo.world.demo.train_and_evaluate`); with ``--rounds``, online DPO in R rounds
(:func:`lora_dpo.world.demo.iterate_demo`)."""

from __future__ import annotations

import argparse

from lora_dpo.cli.train import EXIT_SIGNAL
from lora_dpo.evaluation.report import format_summary
from lora_dpo.iterate.summary import FIGURE_FILE, SUMMARY_FILE, format_rounds
from lora_dpo.world.demo import DEMO_NUM_THREADS, iterate_demo, train_and_evaluate
from lora_dpo.world.worlds import DEFAULT_WORLD, WORLDS


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
    parser.add_argument("--world", choices=tuple(WORLDS), default=DEFAULT_WORLD,
                        help=f"which committed world (default {DEFAULT_WORLD}: SD1.5 layout; digits-sd3: Flow-DPO on a "
                             "small SD3-layout transformer)")
    parser.add_argument("--threads", type=_threads, default=DEMO_NUM_THREADS,
                        help=f"torch threads, or auto (one per core); default {DEMO_NUM_THREADS or 'auto'}: the "
                             "small model runs fastest on one, most of all beside another busy process")
    parser.add_argument("--rounds", type=int, default=None,
                        help="online DPO in R rounds (recipes/<world>/iterate.yaml: best-worst pairs of 8 samples of "
                             "the policy, each round against the previous one); resumes when run again")
    parser.add_argument("overrides", nargs="*", help="section.key=value")


def run(args: argparse.Namespace) -> int:
    if args.rounds is not None:
        result = iterate_demo(args.rounds, args.overrides, num_threads=args.threads, world=args.world)
        if result.interrupted:
            print(f"interrupted by {result.interrupted}; run the same command again to resume")
            return EXIT_SIGNAL.get(result.interrupted, 1)
        print(format_rounds(result.rounds))
        print(f"adapter: {result.adapter_path}\ntable: {result.run_dir / SUMMARY_FILE}   figure: "
              f"{result.run_dir / FIGURE_FILE}   each round's grids: {result.run_dir}/round_*/eval_base/")
        return 0
    result, report = train_and_evaluate(overrides=args.overrides, num_threads=args.threads, world=args.world)
    print(f"trained {result.step} steps: adapter {result.adapter_path}")
    print(format_summary(report))
    return 0
