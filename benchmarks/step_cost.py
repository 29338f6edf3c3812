"""Cost of one Diffusion-DPO training step, by mode, on the tiny and the real SD1.5/SDXL architectures.

Each configuration runs in a fresh subprocess, so its peak memory is its own. A step is what ``lora-dpo train``
does per optimizer step with one micro-batch: VAE encode and text encode, the reference forward (no grad; DPO
modes only), the policy forward and backward, gradient clipping, the optimizer step. Modes:

- ``lora-dpo``: base UNet + LoRA (r 8), reference = the adapter disabled;
- ``lora-sft``: the same LoRA trained on preferred images only, no reference;
- ``full-dpo``: the whole UNet (fp32 master weights) against a frozen copy (``--reference-dtype``,
  ``--reference-offload``);
- ``full-sft``: the whole UNet on preferred images only.

Modes are compared at the same number of images through the UNet per step: a DPO step of N pairs runs 2N images
through the policy, so the SFT modes train on 2N preferred images (2N pairs, one image of each).
Real architectures have random weights (:mod:`lora_dpo.models.archs`); time and memory do not depend on their values.

Reported: steady step time (median of ``--steps`` after ``--warmup`` warm-up steps), images/s and pairs/s, peak
memory during the steps (CUDA max allocated on a GPU; on the CPU the process's peak resident set, reset after
setup, so it includes the resident weights; workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
tensors leave the resident set, which slows CPU steps: ``--default-malloc`` for CPU step times), and the FLOPs of
one step counted on the first warm-up step with ``torch.utils.flop_counter`` (as executed: with gradient
checkpointing this includes the recomputed forward). On a GPU, utilisation = counted FLOPs per second / the GPU's
dense bf16/fp16 peak (``--peak-tflops``, known for H100/H200).

    python benchmarks/step_cost.py                      # tiny pipelines, every mode (seconds)
    python benchmarks/step_cost.py --preset cpu         # SD1.5 512 px + SDXL 512 px on the CPU (about an hour)
    python benchmarks/step_cost.py --preset cpu --default-malloc    # the same, CPU step times
    python benchmarks/step_cost.py --preset gpu         # SD1.5 512 px + SDXL 1024 px, bf16, on one GPU
    python benchmarks/step_cost.py --preset cache --default-malloc   # SD1.5 512 px from images / cache / cache+ref
    python benchmarks/step_cost.py --arch sd15 --mode lora-dpo full-dpo --optim adafactor --resolution 256
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ARCHES = ("tiny", "tiny-sdxl", "sd15", "sdxl")
MODES = ("lora-dpo", "lora-sft", "full-dpo", "full-sft")
OPTIMS = ("adamw", "adamw8bit", "adafactor")
FIELDS = ("arch", "mode", "data", "pairs", "resolution", "mixed_precision", "gradient_checkpointing", "optim",
          "reference_dtype", "reference_offload")
# images: VAE and text encoders run every step; cache: latents and text embeddings from a latent cache (neither
# encoder loaded); cache+ref: also precomputed reference errors (no reference forward, no reference copy).
DATA = ("images", "cache", "cache+ref")
# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the first entry whose words
# all appear in torch.cuda.get_device_name() wins ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0)]


# glibc keeps freed heap memory resident, so on the CPU the peak RSS would count long-dead activations; served by
# mmap, every tensor over 64 KiB goes back to the OS when freed, and the peak RSS measures live memory.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}


def preset(name: str) -> list[dict]:
    """The configurations the README's tables come from."""
    if name == "cpu":  # fp32, 1 pair (2 images) per step, gradient checkpointing so that all fit in 24 GiB
        sd15 = dict(arch="sd15", pairs=1, resolution=512, mixed_precision="no", gradient_checkpointing=True)
        sdxl = dict(arch="sdxl", pairs=1, resolution=512, mixed_precision="no", gradient_checkpointing=True)
        return [
            dict(sd15, mode="lora-dpo", optim="adamw"), dict(sd15, mode="lora-sft", optim="adamw"),
            dict(sd15, mode="lora-dpo", optim="adamw", gradient_checkpointing=False),
            dict(sd15, mode="lora-sft", optim="adamw", gradient_checkpointing=False),
            dict(sd15, mode="full-dpo", optim="adamw"), dict(sd15, mode="full-sft", optim="adamw"),
            dict(sd15, mode="full-dpo", optim="adamw8bit"), dict(sd15, mode="full-dpo", optim="adafactor"),
            dict(sdxl, mode="lora-dpo", optim="adamw"), dict(sdxl, mode="lora-sft", optim="adamw"),
        ]
    if name == "cache":  # SD1.5 512 px fp32, 1 pair: the latent cache and the precomputed reference
        sd15 = dict(arch="sd15", pairs=1, resolution=512, mixed_precision="no", gradient_checkpointing=True,
                    optim="adamw")
        return [
            dict(sd15, mode="lora-dpo", data="images"), dict(sd15, mode="lora-dpo", data="cache"),
            dict(sd15, mode="lora-dpo", data="cache+ref"), dict(sd15, mode="lora-sft", data="cache"),
            dict(sd15, mode="full-dpo", data="cache+ref"), dict(sd15, mode="full-sft", data="cache"),
        ]
    if name == "gpu":  # bf16; SD1.5 at 512 px with 8 pairs, SDXL at 1024 px with 4 pairs
        sd15 = dict(arch="sd15", pairs=8, resolution=512, mixed_precision="bf16", gradient_checkpointing=False)
        sdxl = dict(arch="sdxl", pairs=4, resolution=1024, mixed_precision="bf16", gradient_checkpointing=True)
        return [
            *(dict(sd15, mode=m, optim="adamw8bit") for m in MODES),
            dict(sd15, mode="full-dpo", optim="adafactor"), dict(sd15, mode="full-dpo", optim="adamw"),
            *(dict(sdxl, mode=m, optim="adamw8bit") for m in ("lora-dpo", "lora-sft")),
            dict(sdxl, mode="lora-dpo", optim="adamw8bit", gradient_checkpointing=False),
            dict(sdxl, mode="full-dpo", optim="adafactor"), dict(sdxl, mode="full-sft", optim="adafactor"),
        ]
    raise ValueError(f"unknown preset {name!r}")


def run_worker(spec: dict, steps: int, warmup: int) -> dict:
    import torch
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    from lora_dpo.config import load_config
    from lora_dpo.data.pairs import PairBatch
    from lora_dpo.models.archs import build_components
    from lora_dpo.models.loading import DTYPES
    from lora_dpo.training.memory import current_memory_gb, peak_memory_gb, reset_peak_memory
    from lora_dpo.training.optim import build_optimizer
    from lora_dpo.training.setup import setup_policy
    from lora_dpo.training.steps import dpo_micro_step

    kind, loss = spec["mode"].split("-")
    cfg = load_config(None, [
        f"train.mode={kind}", f"loss.type={'sft' if loss == 'sft' else 'sigmoid'}",
        f"train.mixed_precision={spec['mixed_precision']}",
        f"train.gradient_checkpointing={spec['gradient_checkpointing']}", f"optim.name={spec['optim']}",
        *([f"reference.dtype={spec['reference_dtype']}", f"reference.offload={spec['reference_offload']}"]
          if kind == "full" else []),
    ])
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    device = accelerator.device
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    started = time.perf_counter()
    components = build_components(spec["arch"], weight_dtype, device,
                                  unet_dtype=torch.float32 if kind == "full" else None)
    # The same images through the UNet: N pairs for DPO (2N images), 2N pairs' preferred images for SFT.
    n = spec["pairs"] * (2 if loss == "sft" else 1)
    res = spec["resolution"]
    batch = PairBatch(
        pixel_values=torch.rand(2 * n, 3, res, res) * 2 - 1, captions=["a photo of a cat"] * n,
        original_size=torch.full((2 * n, 2), res), crop_top_left=torch.zeros(2 * n, 2, dtype=torch.long),
        target_size=torch.full((2 * n, 2), res), indices=list(range(n)), draw_seeds=list(range(n)),
    )
    data = spec.get("data", "images")
    if data != "images":  # what a cache row holds, then the encoders are dropped (training from a cache loads none)
        batch = _cached_batch(components, batch, with_reference=data == "cache+ref")
        components = replace(components, vae=None, text_encoders=[], tokenizers=[],
                             scaling_factor=components.latent_scale)
        gc.collect()
    components, policy, weight_dtype = setup_policy(cfg, device, components,
                                                    precomputed_reference=data == "cache+ref")
    optimizer = build_optimizer(policy.params, cfg.optim)
    unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    setup_s = time.perf_counter() - started

    def step():
        loss_, _ = dpo_micro_step(components, unet, policy.reference, batch, cfg.loss, accelerator, weight_dtype)
        accelerator.backward(loss_.mean())
        accelerator.clip_grad_norm_(policy.params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    resident = current_memory_gb(device)
    reset_peak_memory(device)
    times, flops = [], 0
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        if i == 0:
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        else:
            step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    peak_tflops = spec.get("peak_tflops") or _known_peak(device)
    achieved = flops / median / 1e12
    images = 2 * spec["pairs"]
    return {
        **{k: spec[k] for k in FIELDS}, "images_through_unet": images, "device": _device_name(device),
        "threads": torch.get_num_threads(), "setup_s": setup_s, "step_time_s": median, "step_times_s": times,
        "images_per_second": images / median, "pairs_per_second": spec["pairs"] / median if loss == "dpo" else None,
        "peak_memory_gb": peak_memory_gb(device), "resident_before_steps_gb": resident,
        "flops_per_step": flops, "achieved_tflops": achieved,
        "utilisation": achieved / peak_tflops if peak_tflops else None, "peak_tflops": peak_tflops,
        "unet_params_m": sum(p.numel() for p in policy.unet.parameters()) / 1e6,
        "trainable_params_m": sum(p.numel() for p in policy.params) / 1e6,
    }


def _cached_batch(components, batch, with_reference: bool):
    """The :class:`lora_dpo.data.cache.CachedBatch` a cache would give for ``batch`` (posterior and text encoded now;
    with ``with_reference``, stand-in reference errors: their values do not change the cost)."""
    import torch

    from lora_dpo.data.cache import CachedBatch
    from lora_dpo.models.loading import encode_posterior, encode_prompts

    with torch.no_grad():
        mean, std = encode_posterior(components, batch.pixel_values)
        text = encode_prompts(components, batch.captions)
    cached = CachedBatch(latent_mean=mean, latent_std=std, text=text, original_size=batch.original_size,
                         crop_top_left=batch.crop_top_left, target_size=batch.target_size, indices=batch.indices,
                         draw_seeds=batch.draw_seeds)
    if with_reference:
        cached.ref_mse = torch.rand(2 * batch.num_pairs, device=mean.device)
    return cached


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def _known_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if all(part in name for part in key.split()):
            return value
    return None


def table(results: list[dict]) -> str:
    """The results as a markdown table."""
    head = ("| arch | mode | data | optimizer | px | precision | grad ckpt | images/step | step time (s) | images/s | "
            "peak memory (GiB) | TFLOP/step | utilisation |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['mode']} | {r.get('data', 'images')} | {r['optim']} | {r['resolution']} | "
                         f"{r['mixed_precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {2 * r['pairs']} | "
                         f"{r['error']} | | | | |")
            continue
        spread = max(r["step_times_s"]) - min(r["step_times_s"])
        util = f"{100 * r['utilisation']:.0f}%" if r.get("utilisation") else "n/a"
        lines.append(
            f"| {r['arch']} | {r['mode']} | {r.get('data', 'images')} | {r['optim']} | {r['resolution']} | "
            f"{r['mixed_precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['images_through_unet']} | "
            f"{r['step_time_s']:.3g} (±{spread / 2:.2g}) | {r['images_per_second']:.3g} | {r['peak_memory_gb']:.2f} | "
            f"{r['flops_per_step'] / 1e12:.3g} | {util} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[str]:
    """The issue's targets, for each (arch, resolution, precision, checkpointing, optimizer) group that has them."""
    out = []
    ok = [r for r in results if "error" not in r]
    key = lambda r: (r["arch"], r["resolution"], r["mixed_precision"], r["gradient_checkpointing"])  # noqa: E731
    for group, rows in itertools.groupby(sorted(ok, key=key), key=key):
        rows = list(rows)
        by = {(r["mode"], r["optim"], r.get("data", "images")): r for r in rows}
        for optim in OPTIMS:
            label = f"{group[0]} {group[1]} px {group[2]} ckpt={group[3]} {optim}"
            dpo, sft, full = (by.get((m, optim, "images")) for m in ("lora-dpo", "lora-sft", "full-dpo"))
            if dpo and sft:
                out.append(f"{label}: LoRA-DPO / LoRA-SFT memory {dpo['peak_memory_gb'] / sft['peak_memory_gb']:.3f}, "
                           f"step time {dpo['step_time_s'] / sft['step_time_s']:.3f}")
            if dpo and full:
                out.append(f"{label}: LoRA-DPO / full-DPO memory {dpo['peak_memory_gb'] / full['peak_memory_gb']:.3f}")
            cached, ref = by.get(("lora-dpo", optim, "cache")), by.get(("lora-dpo", optim, "cache+ref"))
            sft_cached = by.get(("lora-sft", optim, "cache"))
            full_ref, full_sft = by.get(("full-dpo", optim, "cache+ref")), by.get(("full-sft", optim, "cache"))
            if dpo and cached:
                out.append(f"{label}: LoRA-DPO from the cache / from images, step time "
                           f"{cached['step_time_s'] / dpo['step_time_s']:.3f}")
            if ref and sft_cached:
                out.append(f"{label}: LoRA-DPO with precomputed reference / LoRA-SFT (both cached), step time "
                           f"{ref['step_time_s'] / sft_cached['step_time_s']:.3f}")
            if full_ref and full_sft:
                out.append(f"{label}: full-DPO with precomputed reference / full-SFT (both cached), peak memory "
                           f"{full_ref['peak_memory_gb'] / full_sft['peak_memory_gb']:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["cpu", "gpu", "cache"],
                        help="the README's configurations (overrides the rest)")
    parser.add_argument("--data", nargs="+", default=["images"], choices=DATA,
                        help="images, or a latent cache (cache), with precomputed reference errors (cache+ref)")
    parser.add_argument("--arch", nargs="+", default=["tiny", "tiny-sdxl"], choices=ARCHES)
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--optim", nargs="+", default=["adamw"], choices=OPTIMS)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per DPO step (SFT trains on 2x as many images)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--reference-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--reference-offload", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 tiny, 3 real)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3 tiny, 1 real)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for the utilisation column")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default allocator in the workers: CPU steps run ~25%% faster, but the "
                             "peak RSS then also counts freed heap memory")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_worker(spec, spec.pop("steps"), spec.pop("warmup"))))
        return
    if args.preset:
        specs = [{"reference_dtype": "auto", "reference_offload": False, "data": "images", **s}
                 for s in preset(args.preset)]
    else:
        specs = [
            dict(arch=a, mode=m, optim=o, data=d, pairs=args.pairs, resolution=args.resolution,
                 mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                 reference_dtype=args.reference_dtype, reference_offload=args.reference_offload)
            for a, m, o, d in itertools.product(args.arch, args.mode, args.optim, args.data)
        ]
    results = []
    for spec in specs:
        real = not spec["arch"].startswith("tiny")
        spec = dict(spec, peak_tflops=args.peak_tflops,
                    steps=args.steps or (3 if real else 10), warmup=args.warmup or (1 if real else 3))
        print(f"running {json.dumps({k: spec[k] for k in FIELDS})}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                              env=dict(os.environ) if args.default_malloc else WORKER_ENV)
        if proc.returncode:
            reason = ("killed (SIGKILL: out of memory?)" if proc.returncode == -9
                      else f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:80]}")
            print(f"  failed, {reason}: {proc.stderr[-3000:]}", file=sys.stderr)
            results.append({**{k: spec[k] for k in FIELDS}, "error": reason})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {r['step_time_s']:.3g} s/step, peak {r['peak_memory_gb']:.2f} GiB", file=sys.stderr, flush=True)
        if args.json:  # written after every configuration: a long run keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    print()
    for line in ratios(results):
        print(f"- {line}")


if __name__ == "__main__":
    main()
