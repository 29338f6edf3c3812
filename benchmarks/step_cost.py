"""Cost of one LoRA Diffusion-DPO training step: steady step time, pairs per second, peak memory.

Each configuration runs in a fresh subprocess (so peak memory is its own). A step is what ``lora-dpo train``
does per optimizer step with one micro-batch: VAE encode + text encode, the reference forward (adapter disabled,
no grad), the policy forward and backward, gradient clipping and the optimizer step.

    python benchmarks/step_cost.py                                  # tiny SD1.5- and SDXL-style pipelines
    python benchmarks/step_cost.py --arch tiny-sd15 --pairs 8 --resolution 64 --json out.json

Peak memory is CUDA max allocated on a GPU, the process's peak resident set size on the CPU.
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

ARCHES = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}


def run_worker(args) -> dict:
    import torch
    from accelerate import Accelerator

    from lora_dpo.config import load_config
    from lora_dpo.data import PairBatch
    from lora_dpo.optim import build_optimizer
    from lora_dpo.tiny import save_tiny_pipeline
    from lora_dpo.train import dpo_micro_step, peak_memory_gb, setup_policy

    arch = args.arch[0]
    family = ARCHES[arch]
    baseline = peak_memory_gb(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_pipeline(Path(tmp) / arch, family)
        cfg = load_config(None, [
            f"model.pretrained_model_name_or_path={model_dir}", f"train.mixed_precision={args.mixed_precision}",
            f"train.gradient_checkpointing={args.gradient_checkpointing}", f"optim.name={args.optim}",
        ])
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
        comps, params, dtype = setup_policy(cfg, accelerator.device)
        optimizer = build_optimizer(params, cfg.optim)
        unet, optimizer = accelerator.prepare(comps.unet, optimizer)
        generator = torch.Generator(accelerator.device).manual_seed(0)
        n, res = args.pairs, args.resolution
        batch = PairBatch(
            pixel_values=torch.rand(2 * n, 3, res, res) * 2 - 1, captions=["a photo of a cat"] * n,
            original_size=torch.full((2 * n, 2), res), crop_top_left=torch.zeros(2 * n, 2, dtype=torch.long),
            target_size=torch.full((2 * n, 2), res), indices=list(range(n)),
        )
        times = []
        for i in range(args.warmup + args.steps):
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss, _ = dpo_micro_step(comps, unet, accelerator.unwrap_model(unet), batch, generator,
                                     cfg.loss.beta, accelerator, dtype)
            accelerator.backward(loss.mean())
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        return {
            "arch": arch, "mode": "lora-dpo", "pairs": n, "images_through_unet": 2 * n, "resolution": res,
            "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
            "optimizer": args.optim, "device": str(accelerator.device), "threads": torch.get_num_threads(),
            "step_time_s": median, "step_time_iqr_s": _iqr(times), "pairs_per_second": n / median,
            "peak_memory_gb": peak_memory_gb(accelerator.device), "baseline_memory_gb": baseline,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        }


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(ARCHES), choices=list(ARCHES))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optim", default="adamw", choices=["adamw", "adamw8bit"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    results = []
    for arch in args.arch:
        cmd = [sys.executable, __file__, "--worker", "--arch", arch, "--pairs", str(args.pairs),
               "--resolution", str(args.resolution), "--mixed-precision", args.mixed_precision,
               "--optim", args.optim, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{arch} failed:\n{proc.stderr[-4000:]}")
        out = proc.stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print("| arch | mode | pairs | px | precision | grad ckpt | step time (s) | pairs/s | peak memory (GiB) | "
          "of which before loading (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arch']} | {r['mode']} | {r['pairs']} | {r['resolution']} | {r['mixed_precision']} | "
              f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['step_time_s']:.3f} ± {r['step_time_iqr_s']:.3f} | "
              f"{r['pairs_per_second']:.1f} | {r['peak_memory_gb']:.2f} | {r['baseline_memory_gb']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
