"""How the run guards treat NaN/Inf gradients under each precision (a GPU check: fp16 needs CUDA).

Trains the tiny SD1.5 pipeline through the real ``lora-dpo train`` on photo pairs, in settings that overflow on
purpose, and prints per run: the exit code, the steps whose gradient norm was NaN/Inf, and the error line. Under fp16
the loss scaler skips its own overflows and halves its scale (65536 -> 1 takes 16 of them); only overflows at a
scale of 1 or less count towards ``train.stop_after_nonfinite_grads``, so a run whose first steps overflow keeps
going, and one whose gradients are NaN/Inf unscaled stops.

    python benchmarks/fp16_nonfinite.py --json out.json        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "fp16, beta 5000": ("train.mixed_precision=fp16", "optim.lr=1e-4"),
    "fp16, beta 1e6 (early overflows)": ("train.mixed_precision=fp16", "optim.lr=1e-4", "loss.beta=1e6"),
    "fp16, beta 1e30": ("train.mixed_precision=fp16", "loss.beta=1e30"),
    "bf16, beta 1e30": ("train.mixed_precision=bf16", "loss.beta=1e30"),
    "fp16, lr 1e30": ("train.mixed_precision=fp16", "optim.lr=1e30", "optim.max_grad_norm=null",
                      "train.checkpoint_every=1"),
}


def run(name: str, extra: tuple[str, ...], model: Path, data: Path, folder: Path, steps: int) -> dict:
    out = folder / name.replace(" ", "_").replace(",", "")
    argv = [sys.executable, "-m", "lora_dpo.cli", "train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
            f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", "data.resolution=64",
            f"output.dir={out}", "train.batch_size=4", "optim.name=adamw", "output.tensorboard=false",
            "train.checkpoint_every=10", f"train.max_steps={steps}", *extra]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return {"run": name, "overrides": list(extra), "exit": proc.returncode, "steps_logged": len(rows),
            "nonfinite_grad_steps": [r["step"] for r in rows if not math.isfinite(r.get("grad_norm", 0.0))],
            "weights_moved": rows[-1].get("diagnostics/weights_moved") if rows else None,
            "error": next((line for line in proc.stderr.splitlines() if line.startswith("error:")), None),
            "traceback": proc.stderr[-1500:] if proc.returncode not in (0, 1) or "Traceback" in proc.stderr else None,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    import torch

    from lora_dpo.models.archs import save_tiny_pipeline
    from lora_dpo.world.demo import build_photo_pairs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: fp16 mixed precision needs CUDA; run this on a GPU machine")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = save_tiny_pipeline(folder / "tiny-sd15", "sd15", seed=0)
        data = build_photo_pairs(folder / "pairs.parquet")
        rows = [run(name, RUNS[name], model, data, folder, args.steps) for name in args.runs]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
