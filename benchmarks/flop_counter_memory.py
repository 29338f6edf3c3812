"""Does ``torch.utils.flop_counter`` change a checkpointed step's peak memory? (It did: issue 17.)

A small FLUX-shaped transformer (2 double and 6 single blocks, 8 heads x 64, random weights) with the kit's LoRA and
gradient checkpointing runs one forward and backward of 2 images (a 96 x 96 latent: 2304 image tokens and 128 text
tokens each) through the FLUX family's ``predict``, in a fresh process per case, with and without checkpointing,
with and without ``FlopCounterMode`` around the step. Reported: the process's peak resident set (glibc told to give
freed memory back, ``MALLOC_MMAP_THRESHOLD_=65536``, so the peak is live memory).

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


def worker(counter: bool, checkpointing: bool) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from lora_dpo.config import load_config
    from lora_dpo.models.families import Components, get_family
    from lora_dpo.training.setup import setup_policy

    torch.manual_seed(0)
    family = get_family("flux")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=64, num_attention_heads=8,
        joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 24, 24),
    ).requires_grad_(False).eval()
    components = Components("flux", transformer, None, [], [], FlowMatchEulerDiscreteScheduler(), "flow",
                            scaling_factor=1.0)
    cfg = load_config(None, [f"train.gradient_checkpointing={str(checkpointing).lower()}", "optim.name=adamw"])
    components, _, _ = setup_policy(cfg, "cpu", components)
    n = 2
    x, t = torch.randn(n, 16, 96, 96), torch.full((n,), 500.0)
    cond = {"encoder_hidden_states": torch.randn(n, 128, 256), "pooled_projections": torch.randn(n, 64),
            "guidance": torch.full((n,), 3.5)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def step():
        family.predict(transformer, x, t, cond).pow(2).mean().backward()

    if counter:
        with FlopCounterMode(display=False):
            step()
    else:
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"flop_counter": counter, "gradient_checkpointing": checkpointing, "peak_rss_gib": round(peak, 3),
            "before_step_gib": round(before, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0] == "1", args.worker[1] == "1")))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = []
    for counter, ckpt in itertools.product((False, True), (True, False)):
        out = subprocess.run([sys.executable, __file__, "--worker", str(int(counter)), str(int(ckpt))], env=env,
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        r = results[-1]
        print(f"flop counter {'on ' if counter else 'off'}  checkpointing {'on ' if ckpt else 'off'}  "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB (before the step {r['before_step_gib']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
