"""What the T5 length costs the digits-sd3 world's transformer: why the world declares 32 T5 tokens, not SD3's 256.

The SD3 transformer attends to every caption token, padding included: 32 CLIP tokens plus L T5 tokens beside the
image's 16 tokens. This times the world's own transformer (``worlds/digits-sd3/pipeline/transformer``) on inputs of
the demo's shape, one Flow-DPO step's worth of work: 64 images (32 pairs) forward and backward (the policy; here
with every weight's gradient, an upper bound on LoRA's) and 64 forward without gradients (the reference), for
several T5 lengths. Median of ``--repeats`` after one warm-up, on ``--threads`` torch threads (the demo uses 1).

    python benchmarks/t5_length_cost.py --json benchmarks/results/t5_length_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "worlds" / "digits-sd3" / "pipeline"


def step_seconds(transformer, t5_tokens: int, images: int, repeats: int) -> float:
    """Median seconds of one policy pass (forward + backward) and one reference pass (forward) on ``images``."""
    cfg = transformer.config
    clip_tokens = 32  # the world's CLIP tokenizers' length
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(images, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator)
    text = torch.randn(images, clip_tokens + t5_tokens, cfg.joint_attention_dim, generator=generator)
    pooled = torch.randn(images, cfg.pooled_projection_dim, generator=generator)
    sigma = torch.rand(images, generator=generator) * 1000
    kwargs = dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
                  return_dict=False)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        transformer(**kwargs)[0].square().mean().backward()
        with torch.no_grad():
            transformer(**kwargs)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
        transformer.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    from diffusers import SD3Transformer2DModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32,77,256", help="T5 lengths, comma-separated (default 32,77,256)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformer = SD3Transformer2DModel.from_pretrained(WORLD, subfolder="transformer")
    rows = {}
    print("| T5 tokens | text + image tokens | s per step (64 images policy + 64 reference) |\n|---|---|---|")
    for length in (int(v) for v in args.lengths.split(",")):
        seconds = step_seconds(transformer, length, args.images, args.repeats)
        image_tokens = (transformer.config.sample_size // transformer.config.patch_size) ** 2
        rows[length] = {"seconds": seconds, "tokens": 32 + length + image_tokens}
        print(f"| {length} | {32 + length} + {image_tokens} | {seconds:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "images": args.images, "repeats": args.repeats,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
