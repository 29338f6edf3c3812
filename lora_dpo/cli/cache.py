"""``lora-dpo cache RECIPE --out DIR``: encode a recipe's pairs once (VAE latents, text embeddings, optionally the
reference errors of fixed draws) into a keyed cache that ``data.latent_cache`` trains from."""

from __future__ import annotations

import argparse
import json

from lora_dpo.config import load_config
from lora_dpo.training.cache_build import build_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the recipe the cache serves (model, data, resolution, ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--out", required=True, help="cache folder (an interrupted build continues there)")
    parser.add_argument("--reference-draws", type=int, default=0,
                        help="K > 0: also precompute the reference errors of K fixed draws per pair (no reference "
                             "pass in training; full mode keeps no reference copy)")
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per Arrow shard (the unit of resume)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per encoder call")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="storage dtype of the latents (default: the VAE's, exact)")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache built for another recipe")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    manifest = build_cache(cfg, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                           reference_draws=args.reference_draws, storage_dtype=args.dtype, overwrite=args.overwrite)
    print(f"cache {args.out}: {manifest['pairs']} pairs in {len(manifest['shards'])} shards, skipped "
          f"{json.dumps(manifest['skipped'])}; train from it with data.latent_cache={args.out}")
    return 0
