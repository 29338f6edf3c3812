"""Sampling time of a pipeline: base, with a LoRA adapter loaded (unfused), and with it fused for the sampling.

``lora-dpo eval`` samples the base model, then loads the run's adapter (``pipe.load_lora_weights``) and samples the
tuned model from the same seeds. Unfused, every adapted layer runs three matmuls (W x, A x, B (A x)) plus the
PEFT wrapper's bookkeeping; a small model's layers are so small that this multiplies the sampling time.
:func:`lora_dpo.inference.sampling.fused_adapters` folds the adapter into the weights while the tuned set samples
(and restores the weights bit for bit after). This benchmark times ``--repeats`` calls of
:func:`lora_dpo.inference.sampling.generate_images` (``--batch`` images, ``--steps`` sampler steps, guidance 3)
in each mode, interleaved (base, unfused, fused, base, ...) so that a change in the machine's load hits every mode
alike, and reports the medians and the ratios to base; it also reports how far the fused images are from the
unfused ones (max abs pixel difference, 0-255) and checks the weights after the fusing equal those before.

    python benchmarks/sampling_cost.py --json benchmarks/results/sampling_cost_cpu.json   # digits world, 1 thread
    python benchmarks/sampling_cost.py --threads 2                                          # torch on 2 threads
    python benchmarks/sampling_cost.py --threads 2 --busy          # beside one busy process (the issue's case)
    python benchmarks/sampling_cost.py --model PIPELINE --adapter RUN_DIR --resolution 512 --batch 1 --steps 10

Default: the digits world's pipeline (the demo's model, 32 px, eval batches of 64) with a random rank-8 adapter
on the digits recipe's target modules, or ``--adapter`` (a run folder or LoRA file, e.g. ``adapters/digits-dpo``
after ``lora-dpo demo``). ``--model`` takes any SD1.5/SDXL pipeline folder (real architectures: give
``--adapter`` trained on it, or a random one is made for its UNet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lora_dpo.config import LoraConfig, load_config
from lora_dpo.export.artifacts import save_lora_adapter
from lora_dpo.feedback.prompts import load_prompts
from lora_dpo.inference.sampling import fused_adapters, generate_images, load_pipeline
from lora_dpo.models.adapters import add_lora
from lora_dpo.models.loading import detect_family, read_model_index
from lora_dpo.models.lora_files import load_adapter, resolve_lora_file
from lora_dpo.world.build import WORLD_DIR
from lora_dpo.world.demo import DIGITS_RECIPE

MODES = ("base", "unfused", "fused")


def random_adapter(model: Path, out: Path, r: int = 8, std: float = 0.05, seed: int = 0) -> Path:
    """A LoRA for ``model``'s UNet on the digits recipe's target modules, seeded random A and B (B != 0, so the
    adapter changes the images), saved by the kit's exporter. Returns the file."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    targets = load_config(DIGITS_RECIPE).lora.target_modules
    g = torch.Generator().manual_seed(seed)
    for p in add_lora(unet, LoraConfig(r=r, lora_alpha=r, target_modules=targets)):
        p.data = torch.randn(p.shape, generator=g) * std
    return save_lora_adapter(out, unet, detect_family(read_model_index(str(model))))


def _state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def _max_diff(a: list, b: list) -> int:
    """The largest absolute pixel difference (0-255) between two lists of images."""
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


def measure(args: argparse.Namespace) -> dict:
    """Times of each mode (seconds per call), the fused-vs-unfused pixel difference and the restore check. Base
    samples a pipeline without adapters; unfused and fused sample a second copy with the adapter loaded as
    ``lora-dpo eval`` loads it."""
    model = Path(args.model)
    pipes = {"base": load_pipeline(model), "tuned": load_pipeline(model)}
    prompts = load_prompts("digits")
    chunk = [prompts[i % len(prompts)] for i in range(args.batch)]
    seeds = list(range(10_000, 10_000 + args.batch))
    call = dict(num_inference_steps=args.steps, guidance_scale=3.0, height=args.resolution, width=args.resolution,
                batch_size=args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = resolve_lora_file(args.adapter) if args.adapter else random_adapter(model, Path(tmp))
        load_adapter(pipes["tuned"], adapter, "tuned")
    times: dict[str, list[float]] = {m: [] for m in MODES}
    images: dict[str, list] = {}
    for pipe in pipes.values():
        generate_images(pipe, chunk[:2], seeds[:2], **call)  # warm-up
    restored = True
    for _ in range(args.repeats):
        for mode in MODES:
            pipe = pipes["base" if mode == "base" else "tuned"]
            before = _state(pipe) if mode == "fused" else None
            t0 = time.perf_counter()
            if mode == "fused":
                with fused_adapters(pipe):
                    images[mode] = generate_images(pipe, chunk, seeds, **call)
            else:
                images[mode] = generate_images(pipe, chunk, seeds, **call)
            times[mode].append(time.perf_counter() - t0)
            if before is not None:
                after = _state(pipe)
                restored = restored and all(torch.equal(before[k], after[k]) for k in before)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"model": str(model), "adapter": str(adapter) if args.adapter else "random r8", "threads": args.threads,
            "batch": args.batch, "steps": args.steps, "resolution": args.resolution, "repeats": args.repeats,
            "times_s": times, "median_s": med, "unfused_over_base": med["unfused"] / med["base"],
            "fused_over_base": med["fused"] / med["base"],
            "fused_vs_unfused_max_pixel_diff": _max_diff(images["fused"], images["unfused"]),
            "adapter_vs_base_max_pixel_diff": _max_diff(images["unfused"], images["base"]),
            "weights_restored_bit_exact": restored}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(WORLD_DIR / "pipeline"), help="a pipeline folder (default: digits)")
    parser.add_argument("--adapter", default=None, help="run folder or LoRA file (default: a random rank-8 LoRA)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="images per pipeline call (eval's default: 64)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (eval's default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's default: 1)")
    parser.add_argument("--busy", action="store_true",
                        help="measure beside one busy process (a pure-Python loop, one core at 100 %%)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    busy = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"]) if args.busy else None
    try:
        row = measure(args)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    row["busy"] = args.busy
    med = row["median_s"]
    print(f"| model | threads | batch × steps | base s | adapter unfused s | adapter fused s | unfused / base | "
          f"fused / base |\n|---|---|---|---|---|---|---|---|\n| {Path(row['model']).name} | {args.threads} | "
          f"{args.batch} × {args.steps} | {med['base']:.2f} | {med['unfused']:.2f} | {med['fused']:.2f} | "
          f"{row['unfused_over_base']:.2f} | {row['fused_over_base']:.2f} |")
    print(f"fused vs unfused images: max pixel difference {row['fused_vs_unfused_max_pixel_diff']} (0-255); "
          f"adapter vs base: {row['adapter_vs_base_max_pixel_diff']}; weights restored bit-exact: "
          f"{row['weights_restored_bit_exact']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0 if row["weights_restored_bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
