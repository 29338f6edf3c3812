"""Does ``torch.utils.flop_counter`` change a checkpointed step's peak memory? (It did: issue 17.)

Two small random-weight denoisers with the kit's LoRA, one forward and backward each, in a fresh process per case,
with and without gradient checkpointing, with and without ``FlopCounterMode`` around the step:

- ``flux``: a FLUX-shaped transformer (2 double and 6 single blocks, 8 heads x 64) on 2 images (a 96 x 96 latent:
  2304 image tokens and 128 text tokens each), through the FLUX family's ``predict``;
- ``unet``: an SD-shaped UNet (3 cross-attention blocks of 64 / 128 / 256 channels) on 4 latents of 96 x 96.

Reported: the process's peak resident set (glibc told to give freed memory back, ``MALLOC_MMAP_THRESHOLD_=65536``,
so the peak is live memory).

    python benchmarks/flop_counter_memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys


def worker(arch: str, counter: bool, checkpointing: bool) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from lora_dpo.config import load_config
    from lora_dpo.models.families import Components, get_family
    from lora_dpo.training.setup import setup_policy

    torch.manual_seed(0)
    cfg = load_config(None, [f"train.gradient_checkpointing={str(checkpointing).lower()}", "optim.name=adamw"])
    if arch == "flux":
        family = get_family("flux")
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=64,
            num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=(16, 24, 24))
        scheduler = FlowMatchEulerDiscreteScheduler()
        x, t = torch.randn(2, 16, 96, 96), torch.full((2,), 500.0)
        cond = {"encoder_hidden_states": torch.randn(2, 128, 256), "pooled_projections": torch.randn(2, 64),
                "guidance": torch.full((2,), 3.5)}
    else:
        family = get_family("sd15")
        model = UNet2DConditionModel(
            block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
        scheduler = None
        x, t = torch.randn(4, 4, 96, 96), torch.full((4,), 500)
        cond = {"encoder_hidden_states": torch.randn(4, 77, 64)}
    model.requires_grad_(False).eval()
    components = Components(family.name, model, None, [], [], scheduler, "flow" if arch == "flux" else "epsilon",
                            scaling_factor=1.0)
    setup_policy(cfg, "cpu", components)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def step():
        family.predict(model, x, t, cond).pow(2).mean().backward()

    if counter:
        with FlopCounterMode(display=False):
            step()
    else:
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"arch": arch, "flop_counter": counter, "gradient_checkpointing": checkpointing,
            "peak_rss_gib": round(peak, 3), "before_step_gib": round(before, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1] == "1", args.worker[2] == "1")))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = []
    for arch, counter, ckpt in itertools.product(("flux", "unet"), (False, True), (True, False)):
        out = subprocess.run([sys.executable, __file__, "--worker", arch, str(int(counter)), str(int(ckpt))], env=env,
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        r = results[-1]
        print(f"{arch:4}  flop counter {'on ' if counter else 'off'}  checkpointing {'on ' if ckpt else 'off'}  "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB (before the step {r['before_step_gib']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
