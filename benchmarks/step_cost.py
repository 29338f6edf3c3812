"""Cost of one Diffusion-DPO training step, by mode, on the tiny and the real architectures: SD1.5 and SDXL (UNets),
SD3.5-medium and FLUX.1-dev (rectified-flow transformers, optionally on a 4/8-bit base).

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

The flow transformers (``tiny-sd3``, ``tiny-flux``, ``sd3``, ``flux``; "UNet" above means the transformer) train
from a cache with ``--data cache`` / ``cache+ref``: only the transformer is built, and the batch holds random latents
and text embeddings of the shapes the family's VAE and text encoders give (run on the meta device, so nothing is
allocated: T5-XXL alone is 4.7B parameters). The real sizes train from a cache only (``--data images`` is refused
for them). ``--quantization nf4|int8`` (LoRA modes) quantizes the base transformer's block linear layers
(:mod:`lora_dpo.models.quantize`, ``model.quantization``). The transformer is built directly on the device in its
dtype (FLUX.1-dev in bf16 on a GPU: 24 GB, no fp32 copy).

Reported: steady step time (median of ``--steps`` after ``--warmup`` warm-up steps), images/s and pairs/s, peak
memory during the steps (CUDA max allocated on a GPU; on the CPU the process's peak resident set, reset after
setup, so it includes the resident weights; workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
tensors leave the resident set, which slows CPU steps: ``--default-malloc`` for CPU step times), the FLOPs of
one step counted with ``torch.utils.flop_counter`` on one more step after the timed ones and the peak (the
counter's dispatch mode is not part of training; 0 if that step runs out of memory) (as executed: with gradient
checkpointing this includes the recomputed forward; bitsandbytes' 4/8-bit kernels are not counted, its
dequantize-then-matmul path is), and the denoiser's weight bytes before the LoRA is added (parameters, 4/8-bit
ones with their quantization statistics, as :func:`lora_dpo.models.quantize.quantized_bytes`; buffers apart, e.g.
SD3's 0.45 GB sin-cos position table) beside the same tensors' bytes in bf16. On a GPU, utilisation = counted FLOPs
per second / the GPU's dense bf16/fp16 peak (``--peak-tflops``, known for H100/H200).

    python benchmarks/step_cost.py                      # tiny pipelines, every mode (seconds)
    python benchmarks/step_cost.py --preset cpu         # SD1.5 512 px + SDXL 512 px on the CPU (about an hour)
    python benchmarks/step_cost.py --preset cpu --default-malloc    # the same, CPU step times
    python benchmarks/step_cost.py --preset gpu         # SD1.5 512 px + SDXL 1024 px, bf16, on one GPU
    python benchmarks/step_cost.py --preset cache --default-malloc   # SD1.5 512 px from images / cache / cache+ref
    python benchmarks/step_cost.py --preset flow-cpu    # SD3.5-medium 512 px on the CPU: fp32 DPO vs SFT, bf16 vs NF4
                                                        # (expected 20-45 min on 2 cores, 12 GiB peak)
    python benchmarks/step_cost.py --preset flow-gpu    # SD3.5-medium + FLUX.1-dev 1024 px, bf16 vs NF4, one GPU
                                                        # (expected 4-6 min on an H100, 32 GiB peak)
    python benchmarks/step_cost.py --arch sd15 --mode lora-dpo full-dpo --optim adafactor --resolution 256
    python benchmarks/step_cost.py --arch tiny-sd3 tiny-flux --mode lora-dpo lora-sft --data images cache \\
        --quantization none nf4 --steps 2 --warmup 1     # the flow paths on the tiny transformers (2 min)
    python benchmarks/step_cost.py --arch sd3 --data cache --mode lora-dpo --quantization nf4 --resolution 1024 \\
        --mixed-precision bf16 --gradient-checkpointing --pairs 2
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
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

ARCHES = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "sd15", "sdxl", "sd3", "flux")
FLOW_ARCHES = ("tiny-sd3", "tiny-flux", "sd3", "flux")  # rectified-flow transformers
CACHE_ONLY = ("sd3", "flux")  # real sizes whose text encoders (T5-XXL: 4.7B parameters) are never built here
QUANTIZATIONS = ("none", "nf4", "int8")
MODES = ("lora-dpo", "lora-sft", "full-dpo", "full-sft")
OPTIMS = ("adamw", "adamw8bit", "adafactor")
FIELDS = ("arch", "mode", "data", "pairs", "resolution", "mixed_precision", "gradient_checkpointing", "optim",
          "reference_dtype", "reference_offload", "quantization")
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
    """The configurations the README's tables come from (a configuration may set its own ``steps`` / ``warmup``,
    which ``--steps`` / ``--warmup`` override)."""
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
    if name == "flow-cpu":
        # SD3.5-medium at 512 px from a cache, 1 pair, gradient checkpointing: LoRA-DPO vs LoRA-SFT in fp32, then the
        # base in bf16 vs NF4 (bf16 compute). About 5 TFLOP per forward of 2 images; 1 + 2 steps per configuration.
        sd3 = dict(arch="sd3", data="cache", pairs=1, resolution=512, gradient_checkpointing=True, optim="adamw",
                   warmup=1, steps=2)
        return [
            dict(sd3, mode="lora-dpo", mixed_precision="no"), dict(sd3, mode="lora-sft", mixed_precision="no"),
            dict(sd3, mode="lora-dpo", mixed_precision="bf16"),
            dict(sd3, mode="lora-dpo", mixed_precision="bf16", quantization="nf4"),
        ]
    if name == "flow-gpu":
        # bf16, 1024 px, 2 pairs, gradient checkpointing, from a cache: SD3.5-medium and FLUX.1-dev, LoRA-DPO vs
        # LoRA-SFT on a bf16 base, and LoRA-DPO on an NF4 base. The transformers are built on the GPU in bf16.
        sd3 = dict(arch="sd3", data="cache", pairs=2, resolution=1024, mixed_precision="bf16",
                   gradient_checkpointing=True, optim="adamw")
        flux = dict(sd3, arch="flux")
        return [
            *(dict(base, mode=m, quantization=q)
              for base in (sd3, flux) for m, q in (("lora-dpo", "none"), ("lora-sft", "none"), ("lora-dpo", "nf4"))),
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
    from lora_dpo.models.quantize import quantize_linear_layers
    from lora_dpo.training.memory import current_memory_gb, peak_memory_gb, reset_peak_memory
    from lora_dpo.training.optim import build_optimizer
    from lora_dpo.training.setup import attention_kernels, setup_policy
    from lora_dpo.training.steps import dpo_micro_step

    kind, loss = spec["mode"].split("-")
    quantization = spec.get("quantization", "none")
    cfg = load_config(None, [
        f"train.mode={kind}", f"loss.type={'sft' if loss == 'sft' else 'sigmoid'}",
        f"train.mixed_precision={spec['mixed_precision']}",
        f"train.gradient_checkpointing={spec['gradient_checkpointing']}", f"optim.name={spec['optim']}",
        *([f"reference.dtype={spec['reference_dtype']}", f"reference.offload={spec['reference_offload']}"]
          if kind == "full" else []),
        *([f"model.quantization={quantization}"] if quantization != "none" else []),
    ])
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    device = accelerator.device
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    unet_dtype = torch.float32 if kind == "full" else None
    started = time.perf_counter()
    # The same images through the UNet: N pairs for DPO (2N images), 2N pairs' preferred images for SFT.
    n = spec["pairs"] * (2 if loss == "sft" else 1)
    res = spec["resolution"]
    batch = PairBatch(
        pixel_values=torch.rand(2 * n, 3, res, res) * 2 - 1, captions=["a photo of a cat"] * n,
        original_size=torch.full((2 * n, 2), res), crop_top_left=torch.zeros(2 * n, 2, dtype=torch.long),
        target_size=torch.full((2 * n, 2), res), indices=list(range(n)), draw_seeds=list(range(n)),
    )
    data = spec.get("data", "images")
    encoders_built = not (data != "images" and spec["arch"] in FLOW_ARCHES)
    if not encoders_built:  # the transformer alone; no encoder is ever built
        components, batch = _flow_from_cache(spec["arch"], batch, unet_dtype or weight_dtype, device,
                                             with_reference=data == "cache+ref")
    else:
        components = build_components(spec["arch"], weight_dtype, device, unet_dtype=unet_dtype)
        if data != "images":  # what a cache row holds, then the encoders are dropped (training from a cache loads none)
            batch = _cached_batch(components, batch, with_reference=data == "cache+ref")
            components = replace(components, vae=None, text_encoders=[], tokenizers=[],
                                 scaling_factor=components.latent_scale)
            gc.collect()
    unet_params = sum(p.numel() for p in components.unet.parameters())
    bf16_bytes = _tensor_bytes(components.unet, as_bf16=True)
    if quantization != "none":  # the base's block linear layers, as model.quantization does after loading
        quantize_linear_layers(components.unet, quantization, compute_dtype=weight_dtype)
        gc.collect()
    weights = _tensor_bytes(components.unet)
    components, policy, weight_dtype = setup_policy(cfg, device, components,
                                                    precomputed_reference=data == "cache+ref")
    optimizer = build_optimizer(policy.params, cfg.optim)
    unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    setup_s = time.perf_counter() - started

    def step():
        with attention_kernels(components.model_family, device):  # as training runs (FLUX: no cuDNN attention)
            loss_, _ = dpo_micro_step(components, unet, policy.reference, batch, cfg.loss, accelerator,
                                      weight_dtype)
            accelerator.backward(loss_.mean())
        accelerator.clip_grad_norm_(policy.params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    resident = current_memory_gb(device)
    reset_peak_memory(device)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_memory_gb(device)
    # FLOPs on one more step, after the peak is read: the counter's dispatch mode and module tracker are not part of
    # training, and their own memory must not count (a step that runs out of memory under it leaves flops 0).
    try:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    except torch.OutOfMemoryError:
        flops = 0
    median = statistics.median(times)
    peak_tflops = spec.get("peak_tflops") or _known_peak(device)
    achieved = flops / median / 1e12 if flops else None
    images = 2 * spec["pairs"]
    return {
        **{k: spec[k] for k in FIELDS}, "images_through_unet": images, "device": _device_name(device),
        "threads": torch.get_num_threads(), "setup_s": setup_s, "step_time_s": median, "step_times_s": times,
        "images_per_second": images / median, "pairs_per_second": spec["pairs"] / median if loss == "dpo" else None,
        "peak_memory_gb": peak, "resident_before_steps_gb": resident,
        "flops_per_step": flops, "achieved_tflops": achieved,
        "utilisation": achieved / peak_tflops if peak_tflops and achieved else None, "peak_tflops": peak_tflops,
        "unet_params_m": unet_params / 1e6, "trainable_params_m": sum(p.numel() for p in policy.params) / 1e6,
        "weight_bytes": weights["params"], "buffer_bytes": weights["buffers"],
        "bf16_weight_bytes": bf16_bytes["params"], "bf16_buffer_bytes": bf16_bytes["buffers"],
        "encoders_built": encoders_built,
    }


def _tensor_bytes(module, as_bf16: bool = False) -> dict[str, int]:
    """Bytes of ``module``'s parameters (4/8-bit ones with their quantization statistics, as
    :func:`lora_dpo.models.quantize.quantized_bytes` counts them) and of its buffers; ``as_bf16``: what the same
    tensors would take in bf16 (floating ones at 2 bytes an element)."""
    from lora_dpo.models.quantize import quantized_bytes

    def size(t) -> int:
        return t.numel() * (2 if as_bf16 and t.is_floating_point() else t.element_size())

    buffers = sum(size(b) for b in module.buffers())
    if as_bf16:
        return {"params": sum(size(p) for p in module.parameters()), "buffers": buffers}
    counted = quantized_bytes(module)
    return {"params": counted["quantized"] + counted["other"] - buffers, "buffers": buffers}


@contextmanager
def _default_dtype(dtype):
    """Modules created inside are created in ``dtype`` (no fp32 copy first: FLUX.1-dev is 48 GB in fp32)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _flow_from_cache(arch: str, batch, dtype, device, with_reference: bool, seed: int = 0):
    """``(components, cached batch)`` for a flow transformer trained from a latent cache, built without its VAE or
    text encoders: the transformer alone, random, directly on ``device`` in ``dtype``; the batch random latents and
    text embeddings of the shapes the family's own VAE and text encoders give for ``batch`` (the whole pipeline is
    built, and encodes, on the meta device: nothing is allocated). With ``with_reference``, stand-in reference
    errors."""
    import torch

    from lora_dpo.data.cache import CachedBatch
    from lora_dpo.models.families import FAMILIES, Components
    from lora_dpo.models.families.rectified_flow import DEFAULT_SIGMA_SAMPLING

    family = next(f for f in FAMILIES.values() if arch in (f.name, f.tiny_arch))
    with torch.device("meta"):
        parts = family.build_tiny_components(seed) if arch.startswith("tiny") else family.build_real_components()
        meta = Components(family.name, parts["transformer"], parts["vae"], [parts[e] for _, e, _ in family.text_parts],
                          [parts[t] for t, _, _ in family.text_parts], parts["scheduler"], "flow")
        text = family.encode_prompts(meta, batch.captions)
        mean, _ = family.encode_posterior(meta, batch.pixel_values.to("meta"))
    vae_config = parts["vae"].config
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        transformer = family.denoiser_class.from_config(parts["transformer"].config)
    transformer.to(device, dtype).requires_grad_(False).eval()
    scheduler = type(parts["scheduler"]).from_config(parts["scheduler"].config)  # its tables off the meta device
    components = Components(family.name, transformer, None, [], [], scheduler, "flow",
                            scaling_factor=float(vae_config.scaling_factor))
    components.options.update(DEFAULT_SIGMA_SAMPLING, shift_factor=float(vae_config.shift_factor or 0.0))
    del parts, meta
    cached = CachedBatch(latent_mean=torch.randn(mean.shape, device=device),
                         latent_std=torch.full(mean.shape, 0.05, device=device),
                         text={k: torch.randn(v.shape, device=device) for k, v in text.items()},
                         original_size=batch.original_size, crop_top_left=batch.crop_top_left,
                         target_size=batch.target_size, indices=batch.indices, draw_seeds=batch.draw_seeds)
    if with_reference:
        cached.ref_mse = torch.rand(2 * batch.num_pairs, device=device)
    return components, cached


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
    head = ("| arch | mode | data | optimizer | px | precision | grad ckpt | base | images/step | step time (s) | "
            "images/s | peak memory (GiB) | weights (GiB) | TFLOP/step | utilisation |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        first = (f"| {r['arch']} | {r['mode']} | {r.get('data', 'images')} | {r['optim']} | {r['resolution']} | "
                 f"{r['mixed_precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
                 f"{_base(r)} | ")
        if "error" in r:
            lines.append(f"{first}{2 * r['pairs']} | {r['error']} | | | | | |")
            continue
        spread = max(r["step_times_s"]) - min(r["step_times_s"])
        util = f"{100 * r['utilisation']:.0f}%" if r.get("utilisation") else "n/a"
        lines.append(
            f"{first}{r['images_through_unet']} | {r['step_time_s']:.3g} (±{spread / 2:.2g}) | "
            f"{r['images_per_second']:.3g} | {r['peak_memory_gb']:.2f} | {r['weight_bytes'] / 2**30:.3g} | "
            f"{r['flops_per_step'] / 1e12:.3g} | {util} |"
        )
    return "\n".join(lines)


def _base(r: dict) -> str:
    """How the frozen base is held: its quantization, else its dtype (full modes train fp32 master weights)."""
    if r.get("quantization", "none") != "none":
        return r["quantization"]
    if r["mode"].startswith("full"):
        return "fp32"
    return {"no": "fp32"}.get(r["mixed_precision"], r["mixed_precision"])


def ratios(results: list[dict]) -> list[str]:
    """The issue's targets, for each (arch, resolution, precision, checkpointing, base, optimizer) group that has
    them: LoRA-DPO / LoRA-SFT peak memory (target <= 1.10), the cache's savings, and for a quantized base its weight
    bytes / the same weights in bf16 (target <= 0.30) and its memory and time against the unquantized base."""
    out = []
    ok = [r for r in results if "error" not in r]
    key = lambda r: (r["arch"], r["resolution"], r["mixed_precision"], r["gradient_checkpointing"],  # noqa: E731
                     r.get("quantization", "none"))
    for group, rows in itertools.groupby(sorted(ok, key=key), key=key):
        rows = list(rows)
        by = {(r["mode"], r["optim"], r.get("data", "images")): r for r in rows}
        for optim in OPTIMS:
            label = (f"{group[0]} {group[1]} px {group[2]} ckpt={group[3]}"
                     f"{f' {group[4]} base' if group[4] != 'none' else ''} {optim}")
            for data in ("images", "cache"):
                dpo, sft = by.get(("lora-dpo", optim, data)), by.get(("lora-sft", optim, data))
                if dpo and sft:
                    out.append(f"{label}{'' if data == 'images' else ' from the cache'}: LoRA-DPO / LoRA-SFT memory "
                               f"{dpo['peak_memory_gb'] / sft['peak_memory_gb']:.3f} (target <= 1.10), "
                               f"step time {dpo['step_time_s'] / sft['step_time_s']:.3f}")
            dpo, full = (by.get((m, optim, "images")) for m in ("lora-dpo", "full-dpo"))
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
    return out + _quantization_ratios(ok)


def _quantization_ratios(ok: list[dict]) -> list[str]:
    out, seen = [], set()
    same = [k for k in FIELDS if k != "quantization"]
    for r in ok:
        q = r.get("quantization", "none")
        if q == "none":
            continue
        weights = (r["arch"], q, r["mixed_precision"])
        if weights not in seen:  # the same for every mode, size and batch
            seen.add(weights)
            gib = 2**30
            out.append(
                f"{r['arch']} {q} base (other weights {_base({**r, 'quantization': 'none'})}): weights / bf16 weights "
                f"{r['weight_bytes'] / r['bf16_weight_bytes']:.3f} ({'target <= 0.30; ' if q == 'nf4' else ''}"
                f"{r['weight_bytes'] / gib:.3g} GiB vs {r['bf16_weight_bytes'] / gib:.3g} GiB), with buffers "
                f"{(r['weight_bytes'] + r['buffer_bytes']) / (r['bf16_weight_bytes'] + r['bf16_buffer_bytes']):.3f}"
            )
        plain = next((u for u in ok if u.get("quantization", "none") == "none"
                      and all(u.get(k) == r.get(k) for k in same)), None)
        if plain:
            out.append(
                f"{r['arch']} {r['resolution']} px {r['mixed_precision']} ckpt={r['gradient_checkpointing']} "
                f"{r['mode']} {r.get('data', 'images')} {r['optim']}: {q} base / {_base(plain)} base, peak memory "
                f"{r['peak_memory_gb'] / plain['peak_memory_gb']:.3f}, step time "
                f"{r['step_time_s'] / plain['step_time_s']:.3f}"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["cpu", "gpu", "cache", "flow-cpu", "flow-gpu"],
                        help="the README's configurations (overrides the rest)")
    parser.add_argument("--data", nargs="+", default=["images"], choices=DATA,
                        help="images, or a latent cache (cache), with precomputed reference errors (cache+ref)")
    parser.add_argument("--arch", nargs="+", default=["tiny", "tiny-sdxl"], choices=ARCHES)
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--optim", nargs="+", default=["adamw"], choices=OPTIMS)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per DPO step (SFT trains on 2x as many images)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=QUANTIZATIONS,
                        help="the flow transformers' frozen base: none (the weight dtype), nf4 or int8 (LoRA modes)")
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
        specs = [{"reference_dtype": "auto", "reference_offload": False, "data": "images", "quantization": "none",
                  **s} for s in preset(args.preset)]
    else:
        specs = [
            dict(arch=a, mode=m, optim=o, data=d, quantization=q, pairs=args.pairs, resolution=args.resolution,
                 mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                 reference_dtype=args.reference_dtype, reference_offload=args.reference_offload)
            for a, m, o, d, q in itertools.product(args.arch, args.mode, args.optim, args.data, args.quantization)
        ]
    problems = sorted({p for spec in specs for p in [_refusal(spec)] if p})
    if problems:
        parser.error("; ".join(problems))
    results = []
    for spec in specs:
        real = not spec["arch"].startswith("tiny")
        steps = args.steps if args.steps is not None else spec.pop("steps", 3 if real else 10)
        warmup = args.warmup if args.warmup is not None else spec.pop("warmup", 1 if real else 3)
        spec = dict(spec, peak_tflops=args.peak_tflops, steps=steps, warmup=warmup)
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


def _refusal(spec: dict) -> str | None:
    """Why a configuration cannot run here, or None."""
    if spec["arch"] in CACHE_ONLY and spec["data"] == "images":
        return (f"--arch {spec['arch']} trains from a cache only (its text encoders include T5-XXL, 4.7B parameters, "
                "which the benchmark never builds): pass --data cache or cache+ref")
    if spec["quantization"] != "none" and spec["arch"] not in FLOW_ARCHES:
        return (f"--quantization {spec['quantization']} applies to the flow transformers "
                f"({', '.join(FLOW_ARCHES)}), not --arch {spec['arch']}")
    if spec["quantization"] != "none" and spec["mode"].startswith("full"):
        return (f"--quantization {spec['quantization']} freezes the base, which --mode {spec['mode']} trains: "
                "pass --mode lora-dpo lora-sft")
    return None


if __name__ == "__main__":
    main()
