"""What a verified checkpoint costs: writing it (files, SHA-256 manifest, fsyncs, rename) and verifying it on resume,
for the LoRA and full modes of the real architectures (random weights, AdamW state after one step).

The manifest hashes every file once after writing it (read back from the page cache), and a resume hashes it again
before trusting it; this prints both next to the plain write, so the price of "a checkpoint is trusted only once
verified" is a number, not a guess.

    python benchmarks/checkpoint_cost.py                          # SD1.5: LoRA r=8 and full, into a temp folder
    python benchmarks/checkpoint_cost.py --arch sdxl --modes lora --dir /fast/disk --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _state(arch: str, mode: str):
    """(weights, optimizer, scheduler) after one AdamW step of ``mode`` on ``arch``'s UNet (random weights)."""
    import torch

    from lora_dpo.config import LoraConfig, OptimConfig
    from lora_dpo.models.adapters import add_lora, lora_state_dict
    from lora_dpo.models.archs import build_components
    from lora_dpo.training.optim import build_lr_scheduler, build_optimizer

    unet = build_components(arch).unet
    if mode == "lora":
        params = add_lora(unet, LoraConfig())
    else:
        params = list(unet.parameters())
        for p in params:
            p.requires_grad_(True)
    optimizer = build_optimizer(params, OptimConfig(name="adamw", lr=1e-5))
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler = build_lr_scheduler(optimizer, OptimConfig(name="adamw", lr=1e-5), 100)
    weights = lora_state_dict(unet) if mode == "lora" else {k: v.detach() for k, v in unet.state_dict().items()}
    return weights, optimizer, scheduler


def measure(arch: str, mode: str, folder: Path, repeats: int) -> dict:
    """Median seconds of ``save_checkpoint`` (with its manifest), of its SHA-256 manifest alone, and of
    ``verify_checkpoint``; the checkpoint's size."""
    from lora_dpo.training import checkpoint as ckpt

    weights, optimizer, scheduler = _state(arch, mode)
    saves, manifests, verifies, size = [], [], [], 0
    write_manifest = ckpt._write_manifest
    for r in range(repeats):
        run = folder / f"{arch}-{mode}-{r}"
        spent = []

        def timed(tmp, step, _spent=spent):
            t0 = time.perf_counter()
            write_manifest(tmp, step)
            _spent.append(time.perf_counter() - t0)

        ckpt._write_manifest = timed
        try:
            t0 = time.perf_counter()
            path = ckpt.save_checkpoint(run, 1, weights=weights, optimizer=optimizer, lr_scheduler=scheduler,
                                        scaler=None, trainer_state={}, recipe_yaml="", total_limit=None)
            saves.append(time.perf_counter() - t0)
        finally:
            ckpt._write_manifest = write_manifest
        manifests.append(spent[0])
        t0 = time.perf_counter()
        ckpt.verify_checkpoint(path)
        verifies.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        shutil.rmtree(run)
    return {"arch": arch, "mode": mode, "checkpoint_gb": size / 2**30, "save_s": statistics.median(saves),
            "manifest_s": statistics.median(manifests), "verify_s": statistics.median(verifies),
            "hash_gb_per_s": size / 2**30 / statistics.median(verifies), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15", help="sd15, sdxl (real sizes), tiny, tiny-sdxl")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [measure(args.arch, mode, Path(tmp), args.repeats) for mode in args.modes]
    print("| arch | mode | checkpoint (GiB) | save, all (s) | of which SHA-256 manifest (s) | verify on resume (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['mode']} | {r['checkpoint_gb']:.3f} | {r['save_s']:.2f} | {r['manifest_s']:.2f} | "
              f"{r['verify_s']:.2f} |")
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
