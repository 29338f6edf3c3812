"""``lora-dpo validate RECIPE [section.key=value ...]``: check a recipe, its model folder or id, its optimizer, its
starting LoRA and its data (a file, a stream or a latent cache) without loading weights or training."""

from __future__ import annotations

import argparse
import json
import os

from lora_dpo.config import RecipeConfig, load_config
from lora_dpo.data.cache import check_cache
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamedPairs
from lora_dpo.models.loading import detect_family, read_model_index
from lora_dpo.models.lora_files import check_adapter_fits_model
from lora_dpo.training.optim import check_optimizer_available


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/sd15/lora_dpo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")


def data_report(cfg: RecipeConfig) -> dict:
    """Open the recipe's data as training would and describe it: the cache's pair counts, the stream, or the
    data set's report (pairs kept and rows skipped, by reason). Raises what opening the data raises."""
    if cfg.data.latent_cache:
        manifest = check_cache(cfg, cfg.data.latent_cache)
        return {"latent_cache": cfg.data.latent_cache, "pairs": manifest["pairs"], "skipped": manifest["skipped"]}
    if cfg.data.streaming:  # opening the stream checks the source and its columns; rows are checked as read
        StreamedPairs(cfg.data, seed=cfg.train.seed)
        return {"streaming": True, "rows": "checked as they are read"}
    _, report = load_preference_dataset(cfg.data)
    return report


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    family = detect_family(read_model_index(cfg.model.pretrained_model_name_or_path, cfg.model.revision))
    check_optimizer_available(cfg.optim)
    if cfg.lora.init_from:
        check_adapter_fits_model(cfg.lora.init_from, cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    report = data_report(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"recipe OK: {args.recipe}")
    print(f"  model: {cfg.model.pretrained_model_name_or_path} ({family})")
    print(f"  data:  {cfg.data.dataset}: {json.dumps(report)}")
    unit = cfg.loss.unit  # KTO: labeled images (a pair set gives two each)
    print(f"  effective batch: {cfg.train.batch_size} {unit} × {cfg.train.gradient_accumulation_steps} accumulation × "
          f"{world} processes = {cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world} {unit} per step")
    print(f"  mode: {cfg.train.mode}, loss {cfg.loss.describe()}, optimizer {cfg.optim.name}"
          + (f", starting from the LoRA {cfg.lora.init_from} (also the reference)" if cfg.lora.init_from else ""))
    print(f"  run folder: {cfg.run_dir}")
    return 0
