"""``lora-dpo`` command line.

    lora-dpo train RECIPE [section.key=value ...]
    lora-dpo validate RECIPE [section.key=value ...]
    lora-dpo demo [section.key=value ...]
    lora-dpo eval RUN_DIR --scorer ...
    lora-dpo generate MODEL PROMPT ... [--adapter PATH[:SCALE] ...]
    lora-dpo merge MODEL ADAPTER OUT [--scale S] [--unet-only]
    lora-dpo export ADAPTER --format diffusers|peft|kohya --out OUT
    lora-dpo prefs / world ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 1
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "diffusers", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_validate(args) -> int:
    """Check the recipe, the model folder/id and the data set without loading weights or training."""
    from lora_dpo.config import load_config
    from lora_dpo.data.sources import load_preference_dataset
    from lora_dpo.models.loading import detect_family, read_model_index
    from lora_dpo.training.optim import check_optimizer_available

    cfg = load_config(args.recipe, args.overrides)
    family = detect_family(read_model_index(cfg.model.pretrained_model_name_or_path, cfg.model.revision))
    check_optimizer_available(cfg.optim)
    if cfg.lora.init_from:
        from lora_dpo.models.lora_files import check_adapter_fits_model

        check_adapter_fits_model(cfg.lora.init_from, cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    if cfg.data.latent_cache:
        from lora_dpo.data.cache import check_cache

        manifest = check_cache(cfg, cfg.data.latent_cache)
        report = {"latent_cache": cfg.data.latent_cache, "pairs": manifest["pairs"], "skipped": manifest["skipped"]}
    elif cfg.data.streaming:  # opening the stream checks the source and its columns; rows are checked as read
        from lora_dpo.data.streaming import StreamingPairs

        StreamingPairs(cfg.data, seed=cfg.train.seed)
        report = {"streaming": True, "rows": "checked as they are read"}
    else:
        _, report = load_preference_dataset(cfg.data)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"recipe OK: {args.recipe}")
    print(f"  model: {cfg.model.pretrained_model_name_or_path} ({family})")
    print(f"  data:  {cfg.data.dataset}: {json.dumps(report)}")
    unit = "images" if cfg.loss.type == "kto" else "pairs"  # KTO: labeled images (a pair set gives two each)
    print(f"  effective batch: {cfg.train.batch_size} {unit} × {cfg.train.gradient_accumulation_steps} accumulation × "
          f"{world} processes = {cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world} {unit} per step")
    print(f"  mode: {cfg.train.mode}, loss {cfg.loss.describe()}, optimizer {cfg.optim.name}"
          + (f", starting from the LoRA {cfg.lora.init_from} (also the reference)" if cfg.lora.init_from else ""))
    print(f"  run folder: {cfg.run_dir}")
    return 0


def _run_training(cfg) -> int:
    from lora_dpo.training.recipe import train

    result = train(cfg)
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


def cmd_train(args) -> int:
    from lora_dpo.config import load_config

    return _run_training(load_config(args.recipe, args.overrides))


def cmd_cache(args) -> int:
    """Encode a recipe's pairs once (latents, text embeddings, optionally reference errors) into a keyed cache."""
    from lora_dpo.config import load_config
    from lora_dpo.data.cache import build_cache

    cfg = load_config(args.recipe, args.overrides)
    manifest = build_cache(cfg, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                           reference_draws=args.reference_draws, storage_dtype=args.dtype, overwrite=args.overwrite)
    print(f"cache {args.out}: {manifest['pairs']} pairs in {len(manifest['shards'])} shards, skipped "
          f"{json.dumps(manifest['skipped'])}; train from it with data.latent_cache={args.out}")
    return 0


def cmd_demo(args) -> int:
    """Train LoRA-DPO on the committed digits world, then evaluate it against the base model."""
    from lora_dpo.evaluation.run import format_summary
    from lora_dpo.world.demo import train_and_evaluate

    result, report = train_and_evaluate(overrides=args.overrides)
    print(f"trained {result.step} steps: adapter {result.adapter_path}")
    print(format_summary(report))
    return 0


def cmd_eval(args) -> int:
    """Base vs tuned on held-out seeds: win rate, accuracy, diversity, implicit reward; eval.json + PNGs."""
    from lora_dpo.evaluation.run import evaluate_run, format_summary
    from lora_dpo.feedback.prompts import load_prompts

    report = evaluate_run(
        args.run_dir, base_model=args.base_model, scorer_spec=args.scorer, prompts=load_prompts(args.prompts),
        seeds_per_prompt=args.seeds_per_prompt, seed_offset=args.seed_offset,
        heldout_pairs=args.heldout_pairs, max_heldout_pairs=args.max_heldout_pairs,
        num_inference_steps=args.steps, guidance_scale=args.guidance, out_dir=args.out,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, save_images=args.save_images,
        progress=True,
    )
    print(format_summary(report))
    return 0


def cmd_merge(args) -> int:
    """Fuse a LoRA into its base model; write a diffusers pipeline folder (or the UNet alone)."""
    from lora_dpo.export.merge import merge_adapter

    report = merge_adapter(args.model, args.adapter, args.out, scale=args.scale, unet_only=args.unet_only,
                           dtype=args.dtype, revision=args.revision, variant=args.variant, overwrite=args.overwrite)
    print(json.dumps(report, indent=2))
    return 0


def _adapter_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` (scale 1.0 by default)."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def cmd_generate(args) -> int:
    """Images from a base model plus adapters (compel prompt syntax); PNGs with their parameters, and a grid."""
    from lora_dpo.inference.generate import generate

    report = generate(
        args.model, args.prompt, negative_prompt=args.negative_prompt, adapters=[_adapter_arg(a) for a in args.adapter],
        seeds=args.seeds, num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
        height=args.height, width=args.width, out_dir=args.out, device=args.device, dtype=args.dtype,
        grid=not args.no_grid,
    )
    print(f"{len(report['images'])} images in {args.out}" + (f", grid {report['grid']}" if report["grid"] else "")
          + f" ({report['timings']['seconds_per_image']:.2f} s per image)")
    return 0


def cmd_export(args) -> int:
    """Write an adapter in the diffusers, PEFT or kohya (AUTOMATIC1111 / ComfyUI) layout."""
    from diffusers import UNet2DConditionModel

    from lora_dpo.config import load_config
    from lora_dpo.export.formats import export_adapter
    from lora_dpo.models.loading import detect_family, read_model_index
    from lora_dpo.models.lora_files import resolve_lora_file

    file = resolve_lora_file(args.adapter)
    base = args.base
    if base is None:
        recipe = file.parent / "recipe.yaml"
        if not recipe.is_file():
            raise ValueError(f"{file} is not in a lora-dpo run folder (no recipe.yaml): pass --base MODEL")
        base = load_config(recipe).model.pretrained_model_name_or_path
    family = detect_family(read_model_index(base))
    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
    out = export_adapter(file, args.out, args.format, family, unet_config)
    print(f"{args.format} adapter for {base} ({family}): {out}")
    return 0


def cmd_prefs(args) -> int:
    """Sample image pairs and label them with a scorer (AI feedback), or with --relabel re-label an existing
    preference set with a scorer; write a Pick-a-Pic parquet; print the report."""
    from lora_dpo.feedback.prefs import build_preference_set, relabel_preference_set
    from lora_dpo.feedback.prompts import load_prompts
    from lora_dpo.feedback.scorers import load_scorer

    if args.relabel is None and args.pairs_per_prompt is None:
        raise ValueError("--pairs-per-prompt is required when sampling with --model")
    if args.relabel is not None and args.pairs_per_prompt is not None:
        raise ValueError("--pairs-per-prompt applies to sampling (--model), not to --relabel")
    # The scorer loads first: a bad --scorer fails before any data is read or generated.
    scorer = load_scorer(args.scorer, device=args.device, batch_size=args.batch_size)
    if args.relabel is not None:
        report = relabel_preference_set(args.relabel, scorer, args.out, tie_margin=args.tie_margin,
                                        batch_size=args.batch_size, split=args.split)
    else:
        report = build_preference_set(
            args.model, scorer, load_prompts(args.prompts), args.pairs_per_prompt, args.out,
            seed_offset=args.seed_offset, num_inference_steps=args.steps, guidance_scale=args.guidance,
            batch_size=args.batch_size,
        )
    print(json.dumps(report, indent=2))
    return 0


def cmd_world(args) -> int:
    """Build the digits world (base pipeline, scorer, preference sets) on the CPU; see lora_dpo/world.py."""
    from lora_dpo.world.build import WorldConfig, build_world

    cfg = WorldConfig(seed=args.seed, unet_steps=args.unet_steps, vae_steps=args.vae_steps)
    report = build_world(args.out, cfg, with_prefs=not args.no_prefs)
    print(json.dumps({"out": str(args.out), "base_sample_accuracy": report["base_sample_accuracy"],
                      "stage_times_s": report["config"]["stage_times_s"], "size_mb": report["size_mb"]}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-dpo", description="Diffusion-DPO with LoRA for SD1.5 and SDXL")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (
        ("train", cmd_train, "train a recipe"),
        ("validate", cmd_validate, "check a recipe, its model and its data without training"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe YAML, e.g. recipes/sd15/lora_dpo.yaml")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
        p.set_defaults(fn=fn)
    p = sub.add_parser("cache", help="encode a recipe's pairs once: VAE latents, text embeddings, reference errors")
    p.add_argument("recipe", help="the recipe the cache serves (model, data, resolution, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--out", required=True, help="cache folder (an interrupted build continues there)")
    p.add_argument("--reference-draws", type=int, default=0,
                   help="K > 0: also precompute the reference errors of K fixed draws per pair (no reference pass "
                        "in training; full mode keeps no reference copy)")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per Arrow shard (the unit of resume)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per encoder call")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="storage dtype of the latents (default: the VAE's, exact)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built for another recipe")
    p.set_defaults(fn=cmd_cache)
    p = sub.add_parser("demo", help="offline demo: LoRA-DPO on the digits world, then its evaluation")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("eval", help="compare a trained run with its base model on held-out seeds")
    p.add_argument("run_dir", help="a finished run folder (recipe.yaml, pytorch_lora_weights.safetensors)")
    p.add_argument("--scorer", required=True, help="'jpeg' or a folder with classifier.json")
    p.add_argument("--prompts", default="digits", help="'digits' (the ten digit captions) or a text file")
    p.add_argument("--seeds-per-prompt", type=int, default=40)
    p.add_argument("--seed-offset", type=int, default=10_000, help="first seed; clear of the training data's")
    p.add_argument("--heldout-pairs", default=None, help="Pick-a-Pic parquet: implicit-reward accuracy")
    p.add_argument("--max-heldout-pairs", type=int, default=None, help="use only the first N held-out pairs")
    p.add_argument("--base-model", default=None, help="default: the recipe's model")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=64, help="images per pipeline call")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--save-images", action="store_true", help="also write each image to OUT/eval_samples/")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("merge", help="fuse a LoRA into the base weights: a pipeline folder that opens alone")
    p.add_argument("model", help="the base pipeline (hub id or folder) the adapter was trained on")
    p.add_argument("adapter", help="a run folder or a LoRA .safetensors file (diffusers or kohya layout)")
    p.add_argument("out", help="output folder")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength (default 1.0, as trained)")
    p.add_argument("--unet-only", action="store_true", help="write only the UNet (UNet2DConditionModel folder)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the saved weights (fusing is done in fp32)")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None, help="the base's weight variant to read, e.g. fp16")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.set_defaults(fn=cmd_merge)
    from lora_dpo.export.formats import FORMATS
    from lora_dpo.inference.generate import SCHEDULER_NAMES

    p = sub.add_parser("export", help="write an adapter in the diffusers, PEFT or kohya (A1111 / ComfyUI) layout")
    p.add_argument("adapter", help="a run folder or its pytorch_lora_weights.safetensors")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder (kohya: a folder or a .safetensors file)")
    p.add_argument("--base", default=None, help="the base model (default: the run's recipe.yaml)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("generate", help="images from a base model plus adapters; PNG metadata; off/on grid")
    p.add_argument("model", help="diffusers pipeline folder or hub id (SD1.5 or SDXL)")
    p.add_argument("prompt", nargs="+", help="one or more prompts, compel syntax: '(word)1.3', '(a, b).blend(.7, .3)'")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA (run folder or .safetensors) and its scale (default 1.0); repeat for several")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="default", choices=SCHEDULER_NAMES)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="samples", help="output folder (default samples/)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-grid", action="store_true", help="with adapters: skip the adapter-off images and grid")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("prefs", help="preference pairs labelled by a scorer (AI feedback), Pick-a-Pic parquet: "
                                      "sampled from a model (--model) or re-labelled from a data set (--relabel)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="diffusers pipeline folder to sample from")
    source.add_argument("--relabel", metavar="DATASET",
                        help="re-label this preference set (Pick-a-Pic parquet/folder/hub id) with the scorer; "
                             "writes label_0 from the scorer, score_0/score_1, label_0_original, and a report")
    p.add_argument("--scorer", required=True,
                   help="'jpeg', or a folder with classifier.json (digits), aesthetic.json (LAION aesthetic "
                        "predictor) or a CLIP config.json (CLIP score / PickScore)")
    p.add_argument("--prompts", default="digits", help="'digits' (the ten digit captions) or a text file, one per line")
    p.add_argument("--pairs-per-prompt", type=int, default=None, help="pairs per prompt (two seeds each); --model")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="pair k uses seeds S+2k, S+2k+1; give held-out sets a disjoint range")
    p.add_argument("--out", required=True, help="output parquet file")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per pipeline call and per scorer pass; --relabel: also pairs per batch")
    p.add_argument("--tie-margin", type=float, default=0.0,
                   help="--relabel: |score_0 - score_1| <= margin is a tie (label_0 0.5)")
    p.add_argument("--split", default="train", help="--relabel: split of a hub data set / saved DatasetDict")
    p.add_argument("--device", default=None, help="scorer device; default: cuda when available, else cpu")
    p.set_defaults(fn=cmd_prefs)
    p = sub.add_parser("world", help="build the digits world: a small real text-to-image model and its AI feedback")
    world = p.add_subparsers(dest="world_command", required=True)
    from lora_dpo.world.build import WORLD_DIR, WorldConfig

    defaults = WorldConfig()
    p = world.add_parser("build", help="train the base pipeline and scorer, sample the preference sets (CPU)")
    p.add_argument("--out", type=Path, default=WORLD_DIR, help=f"world folder (default {WORLD_DIR})")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    p.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    p.add_argument("--no-prefs", action="store_true", help="skip the preference sets")
    p.set_defaults(fn=cmd_world)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lora_dpo.config import ConfigError
    from lora_dpo.models.loading import ModelLoadError

    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.fn(args)
    except (ConfigError, ModelLoadError, FileNotFoundError, FileExistsError, ValueError, ImportError,
            NotImplementedError) as exc:
        if args.traceback:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        from lora_dpo.training.recipe import TrainingDiverged

        if isinstance(exc, TrainingDiverged) and not args.traceback:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_DIVERGED
        raise


if __name__ == "__main__":
    sys.exit(main())
