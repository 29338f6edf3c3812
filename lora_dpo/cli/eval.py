"""``lora-dpo eval RUN_DIR --scorer SPEC [--against ADAPTER]``: base (or base + ADAPTER) vs tuned on held-out
seeds (win rate, accuracy, fixed / broken comparisons, diversity, implicit reward); writes ``eval.json`` and the
PNGs (:func:`lora_dpo.evaluation.run.evaluate_run`)."""

from __future__ import annotations

import argparse

from lora_dpo.evaluation.report import format_summary
from lora_dpo.evaluation.run import IMPLICIT_DRAWS, evaluate_run
from lora_dpo.feedback.prompts import load_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a finished run folder (recipe.yaml, pytorch_lora_weights.safetensors)")
    parser.add_argument("--scorer", required=True, help="'jpeg' or a folder with classifier.json")
    parser.add_argument("--prompts", default="digits", help="'digits' (the ten digit captions) or a text file")
    parser.add_argument("--seeds-per-prompt", type=int, default=40)
    parser.add_argument("--seed-offset", type=int, default=10_000, help="first seed; clear of the training data's")
    parser.add_argument("--heldout-pairs", default=None, help="Pick-a-Pic parquet: implicit-reward accuracy")
    parser.add_argument("--implicit-draws", type=int, default=IMPLICIT_DRAWS, metavar="K",
                        help=f"draws of (t, noise) per held-out pair (default {IMPLICIT_DRAWS}: the accuracy's "
                             "standard error from the draws under 0.01 on the digits world; it costs K passes a pair)")
    parser.add_argument("--max-heldout-pairs", type=int, default=None, help="use only the first N held-out pairs")
    parser.add_argument("--base-model", default=None, help="default: the recipe's model")
    parser.add_argument("--against", default=None, metavar="ADAPTER",
                        help="compare with this LoRA (run folder or .safetensors file) on the base instead of the "
                             "base alone, e.g. the previous round")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default: the recipe's model.guidance_scale, as FLUX.1-dev trained with; "
                             "else 3.0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per pipeline call")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--save-images", action="store_true", help="also write each image to OUT/eval_samples/")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR)")


def run(args: argparse.Namespace) -> int:
    report = evaluate_run(
        args.run_dir, base_model=args.base_model, scorer_spec=args.scorer, prompts=load_prompts(args.prompts),
        seeds_per_prompt=args.seeds_per_prompt, seed_offset=args.seed_offset,
        heldout_pairs=args.heldout_pairs, max_heldout_pairs=args.max_heldout_pairs,
        implicit_draws=args.implicit_draws,
        num_inference_steps=args.steps, guidance_scale=args.guidance, out_dir=args.out,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, save_images=args.save_images,
        progress=True, reference_adapter=args.against,
    )
    print(format_summary(report))
    return 0
