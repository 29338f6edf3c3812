"""``lora-dpo world build``: build the digits world (base pipeline, scorer, preference sets) on the CPU
(:func:`lora_dpo.world.build.build_world`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lora_dpo.world.build import WORLD_DIR, WorldConfig, build_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    world = parser.add_subparsers(dest="world_command", required=True)
    defaults = WorldConfig()
    p = world.add_parser("build", help="train the base pipeline and scorer, sample the preference sets (CPU)")
    p.add_argument("--out", type=Path, default=WORLD_DIR, help=f"world folder (default {WORLD_DIR})")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    p.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    p.add_argument("--no-prefs", action="store_true", help="skip the preference sets")


def run(args: argparse.Namespace) -> int:
    cfg = WorldConfig(seed=args.seed, unet_steps=args.unet_steps, vae_steps=args.vae_steps)
    report = build_world(args.out, cfg, with_prefs=not args.no_prefs)
    print(json.dumps({"out": str(args.out), "base_sample_accuracy": report["base_sample_accuracy"],
                      "stage_times_s": report["config"]["stage_times_s"], "size_mb": report["size_mb"]}, indent=2))
    return 0
