"""``lora-dpo world build [--family sd15|sd3]``: build a digits world (base pipeline, scorer, preference sets) on the
CPU: the SD1.5-layout ``worlds/digits`` (:func:`lora_dpo.world.build.build_world`) or the SD3-layout
``worlds/digits-sd3`` (:func:`lora_dpo.world.flow.build_flow_world`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lora_dpo.world.build import WORLD_DIR, WorldConfig, build_world
from lora_dpo.world.flow import FLOW_WORLD_DIR, FlowWorldConfig, build_flow_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    world = parser.add_subparsers(dest="world_command", required=True)
    unet, flow = WorldConfig(), FlowWorldConfig()
    p = world.add_parser("build", help="train the base pipeline and scorer, sample the preference sets (CPU)")
    p.add_argument("--family", choices=("sd15", "sd3"), default="sd15",
                   help=f"sd15: a UNet pipeline in {WORLD_DIR} (default); sd3: an SD3-layout transformer pipeline in "
                        f"{FLOW_WORLD_DIR}")
    p.add_argument("--out", type=Path, default=None, help="world folder (default: the family's, above)")
    p.add_argument("--seed", type=int, default=unet.seed)
    p.add_argument("--unet-steps", type=int, default=unet.unet_steps, help="sd15: UNet training steps")
    p.add_argument("--transformer-steps", type=int, default=flow.transformer_steps, help="sd3: transformer training steps")
    p.add_argument("--vae-steps", type=int, default=unet.vae_steps,
                   help="sd15: VAE training steps (sd3 takes the digits world's VAE)")
    p.add_argument("--no-prefs", action="store_true", help="skip the preference sets")


def run(args: argparse.Namespace) -> int:
    if args.family == "sd3":
        out = args.out or FLOW_WORLD_DIR
        cfg = FlowWorldConfig(seed=args.seed, transformer_steps=args.transformer_steps)
        report = build_flow_world(out, cfg, with_prefs=not args.no_prefs)
    else:
        out = args.out or WORLD_DIR
        cfg = WorldConfig(seed=args.seed, unet_steps=args.unet_steps, vae_steps=args.vae_steps)
        report = build_world(out, cfg, with_prefs=not args.no_prefs)
    print(json.dumps({"out": str(out), "base_sample_accuracy": report["base_sample_accuracy"],
                      "stage_times_s": report["config"]["stage_times_s"], "size_mb": report["size_mb"]}, indent=2))
    return 0
