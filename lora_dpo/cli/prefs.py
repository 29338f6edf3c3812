"""``lora-dpo prefs``: preference pairs labelled by a scorer (AI feedback) in a Pick-a-Pic parquet, sampled from a
model (``--model``: two seeds a pair, :func:`lora_dpo.feedback.prefs.build_preference_set`; or N candidates a prompt
paired by a rule, ``--candidates``, :func:`lora_dpo.feedback.prefs.build_candidate_set`) or re-labelled from an existing preference
set (``--relabel``, :func:`lora_dpo.feedback.relabel.relabel_preference_set`); prints the report."""

from __future__ import annotations

import argparse
import json

from lora_dpo.feedback.pairing import PAIRINGS
from lora_dpo.feedback.prefs import VOTES, build_candidate_set, build_preference_set
from lora_dpo.feedback.prompts import load_prompts
from lora_dpo.feedback.relabel import relabel_preference_set
from lora_dpo.feedback.scorers import load_scorer
from lora_dpo.inference.sampling import load_pipeline
from lora_dpo.models.lora_files import load_adapter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="diffusers pipeline folder to sample from")
    source.add_argument("--relabel", metavar="DATASET",
                        help="re-label this preference set (Pick-a-Pic parquet/folder/hub id) with the scorer; "
                             "writes label_0 from the scorer, score_0/score_1, label_0_original, and a report")
    parser.add_argument("--scorer", required=True, action="append",
                        help="'jpeg', or a folder with classifier.json (digits), aesthetic.json (LAION aesthetic "
                             "predictor) or a CLIP config.json (CLIP score / PickScore); repeat it to combine "
                             "scorers by --vote (with --candidates)")
    parser.add_argument("--vote", default="mean-rank", choices=list(VOTES),
                        help="how several --scorer verdicts combine: mean rank per prompt, or pairwise majority")
    parser.add_argument("--adapter", default=None,
                        help="--model: sample from the model plus this LoRA (a run folder or .safetensors file), "
                             "e.g. the policy of the previous round")
    parser.add_argument("--prompts", default="digits",
                        help="'digits' (the ten digit captions), a text file (one per line), or a .csv / .tsv / "
                             ".jsonl / .parquet table")
    parser.add_argument("--prompt-column", default=None,
                        help="the table's prompt column (default: prompt / Prompt / caption / text)")
    parser.add_argument("--pairs-per-prompt", type=int, default=None, help="pairs per prompt (two seeds each); --model")
    parser.add_argument("--candidates", type=int, default=None, metavar="N",
                        help="--model: N images per prompt (seeds S .. S+N-1), paired by --pairing")
    parser.add_argument("--groups-per-prompt", type=int, default=1, metavar="G",
                        help="--candidates: G groups of N per prompt (group j: seeds S+jN .. S+jN+N-1), each paired "
                             "on its own (best-worst: G pairs per prompt)")
    parser.add_argument("--pairing", default="best-worst", choices=PAIRINGS,
                        help="with --candidates: best-worst (one pair per prompt), top-bottom-k (--top-k pairs), all "
                             "(every pair with a gap >= --min-gap), adjacent (seeds 2k, 2k+1)")
    parser.add_argument("--top-k", type=int, default=1, help="pairs per prompt for --pairing top-bottom-k")
    parser.add_argument("--min-gap", type=float, default=0.0, help="smallest score gap of a pair (--candidates)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="pair k uses seeds S+2k, S+2k+1; give held-out sets a disjoint range")
    parser.add_argument("--out", required=True, help="output parquet file")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per pipeline call and per scorer pass; --relabel: also pairs per batch")
    parser.add_argument("--tie-margin", type=float, default=0.0,
                        help="--relabel: |score_0 - score_1| <= margin is a tie (label_0 0.5)")
    parser.add_argument("--split", default="train", help="--relabel: split of a hub data set / saved DatasetDict")
    parser.add_argument("--device", default=None, help="scorer device; default: cuda when available, else cpu")


def run(args: argparse.Namespace) -> int:
    if args.relabel is None and (args.pairs_per_prompt is None) == (args.candidates is None):
        raise ValueError("sampling with --model takes one of --pairs-per-prompt P (two seeds a pair) or --candidates N "
                         "(N images a prompt, paired by --pairing)")
    if args.relabel is not None and (args.pairs_per_prompt is not None or args.candidates is not None):
        raise ValueError("--pairs-per-prompt / --candidates apply to sampling (--model), not to --relabel")
    if len(args.scorer) > 1 and args.candidates is None:
        raise ValueError("several --scorer combine by --vote over each prompt's candidates: sample with --model and "
                         "--candidates N")
    if args.adapter is not None and args.relabel is not None:
        raise ValueError("--adapter applies to sampling (--model), not to --relabel")
    prompts = load_prompts(args.prompts, args.prompt_column) if args.relabel is None else None
    # The scorers load before any data is read or generated: a bad --scorer fails at once.
    scorers = [load_scorer(spec, device=args.device, batch_size=args.batch_size) for spec in args.scorer]
    scorer = scorers[0]
    model = args.model
    if args.adapter is not None:  # the pipeline with the adapter active (checked against the model before sampling)
        model = load_pipeline(args.model)
        load_adapter(model, args.adapter, "policy")
    if args.relabel is not None:
        report = relabel_preference_set(args.relabel, scorer, args.out, tie_margin=args.tie_margin,
                                        batch_size=args.batch_size, split=args.split)
    elif args.candidates is not None:
        report = build_candidate_set(
            model, scorers, prompts, args.candidates, args.out, pairing=args.pairing, k=args.top_k,
            min_gap=args.min_gap, vote=args.vote, seed_offset=args.seed_offset,
            groups_per_prompt=args.groups_per_prompt, num_inference_steps=args.steps,
            guidance_scale=args.guidance, batch_size=args.batch_size,
        )
    else:
        report = build_preference_set(
            model, scorer, prompts, args.pairs_per_prompt, args.out,
            seed_offset=args.seed_offset, num_inference_steps=args.steps, guidance_scale=args.guidance,
            batch_size=args.batch_size,
        )
    if args.adapter is not None:
        report["adapter"] = str(args.adapter)
    print(json.dumps(report, indent=2))
    return 0
