"""How exactly does ``lora-dpo merge`` reproduce the adapter, on the real SD1.5 / SDXL architectures?

Builds the real architecture with random weights, saves it as a diffusers pipeline folder, attaches a rank-r LoRA
with random A and B, and compares one UNet forward (one latent at the training resolution, t = 500, random text
embeddings) of:

- the base UNet with the adapter (fp32): the reference ``y_lora``; the adapter's effect is ``|y_lora - y_base|``;
- the pipeline merged in fp32 by :func:`lora_dpo.export.merge.merge_adapter` and opened from disk;
- the UNet merged and saved in bf16 (``--dtype bfloat16 --unet-only``), run in bf16; next to it, the adapter loaded
  onto the base in bf16 (what a bf16 pipeline with ``load_lora_weights`` computes) and the base alone in bf16 against
  the base in fp32: the rounding floor any bf16 checkpoint has.

    python benchmarks/merge_equivalence.py --arch sd15 --json benchmarks/results/merge_sd15.json

Prints a markdown table (max and mean absolute differences, and the same relative to the adapter's effect) and the
merge time. CPU or GPU (``--device``).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lora_dpo.config import LoraConfig
from lora_dpo.export.artifacts import save_lora_adapter
from lora_dpo.export.merge import merge_adapter
from lora_dpo.models.adapters import adapters_disabled, add_lora
from lora_dpo.models.archs import ARCHES, build_components
from lora_dpo.models.families import pipeline_class
from lora_dpo.models.lora_files import WEIGHT_NAME


def _inputs(unet, family: str, latent: int, device):
    g = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    kw = {"encoder_hidden_states": torch.randn(1, 77, width, generator=g)}
    if family == "sdxl":
        px = latent * 8
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, generator=g),
                                   "time_ids": torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)}
    x = torch.randn(1, 4, latent, latent, generator=g)
    return x.to(device), torch.tensor([500], device=device), _to(kw, device)


def _to(value, device, dtype=None):
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value.to(device, dtype if value.is_floating_point() and dtype else value.dtype)


@torch.no_grad()
def _forward(unet, inputs, dtype=torch.float32):
    x, t, kw = inputs
    return unet(x.to(dtype), t, **_to(kw, x.device, dtype)).sample.float().cpu()


def _diff(a, b, effect):
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "max_rel_to_effect": float(d.max() / effect.max()),
            "mean_rel_to_effect": float(d.mean() / effect.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15", choices=ARCHES)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-std", type=float, default=0.01, help="std of the random LoRA B matrices")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: 64, 512 px; tiny: 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default=None, help="where the pipeline folders go (default: a temp folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    latent = args.latent or (16 if args.arch.startswith("tiny") else 64)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # 1. A base pipeline folder with random weights, and a random LoRA on its UNet.
        comps = build_components(args.arch, torch.float32, "cpu")
        family = comps.family
        parts = dict(unet=comps.unet, vae=comps.vae, scheduler=comps.noise_scheduler, text_encoder=comps.text_encoders[0],
                     tokenizer=comps.tokenizers[0])
        if family == "sdxl":
            parts.update(text_encoder_2=comps.text_encoders[1], tokenizer_2=comps.tokenizers[1])
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline_class(family)(**parts).save_pretrained(work / "base", safe_serialization=True)
        del parts
        unet = comps.unet.to(args.device)
        del comps
        gc.collect()
        inputs = _inputs(unet, family, latent, args.device)
        g = torch.Generator().manual_seed(1)
        add_lora(unet, LoraConfig(r=args.rank, lora_alpha=args.rank))
        for name, p in unet.named_parameters():
            if ".lora_B." in name:  # A keeps PEFT's random init; B (zero at init) gets random values
                p.data = (torch.randn(p.shape, generator=g) * args.lora_std).to(p.device)
        save_lora_adapter(work / "adapter", unet, family)
        unet.set_adapters(["default"], [args.scale])
        y_lora = _forward(unet, inputs)
        with adapters_disabled(unet):
            y_base = _forward(unet, inputs)
        del unet
        gc.collect()
        effect = (y_lora - y_base).abs()

        # 2. Merge in fp32 (a whole pipeline) and in bf16 (the UNet alone), open from disk, compare.
        t0 = time.perf_counter()
        report = merge_adapter(str(work / "base"), work / "adapter", work / "merged", scale=args.scale)
        merge_s = time.perf_counter() - t0
        from diffusers import UNet2DConditionModel

        merged = UNet2DConditionModel.from_pretrained(work / "merged" / "unet").to(args.device)
        y_merged = _forward(merged, inputs)
        del merged
        shutil.rmtree(work / "merged")
        merge_adapter(str(work / "base"), work / "adapter", work / "merged-bf16", scale=args.scale, unet_only=True,
                      dtype="bfloat16")
        merged = UNet2DConditionModel.from_pretrained(work / "merged-bf16", torch_dtype=torch.bfloat16).to(args.device)
        y_merged_bf16 = _forward(merged, inputs, torch.bfloat16)
        del merged
        base = UNet2DConditionModel.from_pretrained(work / "base" / "unet", torch_dtype=torch.bfloat16).to(args.device)
        base_bf16 = _forward(base, inputs, torch.bfloat16)
        base.load_lora_adapter(str(work / "adapter"), weight_name=WEIGHT_NAME, prefix="unet", adapter_name="x")
        base.set_adapters(["x"], [args.scale])
        lora_bf16 = _forward(base, inputs, torch.bfloat16)
        del base
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = {
        "merged fp32 vs adapter fp32": _diff(y_merged, y_lora, effect),
        "merged bf16 vs adapter fp32": _diff(y_merged_bf16, y_lora, effect),
        "adapter on a bf16 base vs adapter fp32": _diff(lora_bf16, y_lora, effect),
        "base bf16 vs base fp32 (rounding floor)": _diff(base_bf16, y_base, effect),
    }
    result = {"arch": args.arch, "rank": args.rank, "lora_std": args.lora_std, "scale": args.scale, "latent": latent,
              "device": args.device, "adapter_effect": {"max_abs": float(effect.max()), "mean_abs": float(effect.mean())},
              "output_rms": float(y_lora.pow(2).mean().sqrt()), "merge_seconds": round(merge_s, 1),
              "modules": report["modules"], "rows": rows}
    print(f"{args.arch}, rank {args.rank}, scale {args.scale}, latent {latent}², {args.device}: adapter effect "
          f"max {effect.max():.3g} / mean {effect.mean():.3g} (output rms {result['output_rms']:.3g}); "
          f"{report['modules']} modules fused in {merge_s:.1f} s (load, fuse, save)")
    print("| comparison | max abs | mean abs | max / max effect | mean / mean effect |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['max_rel_to_effect']:.2e} | "
              f"{r['mean_rel_to_effect']:.2e} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
