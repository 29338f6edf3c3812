"""The demo's speed by torch thread count and OpenMP wait policy, alone and beside one busy process.

``lora-dpo demo`` trains the digits world's small model (300 steps of 32 pairs) and samples 800 images (400 base,
400 tuned, batches of 64, 20 steps, guidance 3). Its ops are many and small, and a second OpenMP thread that has to
wait for a core taken by another process stalls every one of them. This benchmark runs a short proxy of the demo
through the kit's own code paths (:func:`lora_dpo.training.recipe.train` on the digits recipe for ``--steps``
steps after ``--warmup`` steps, then :func:`lora_dpo.inference.sampling.generate_images` for ``--batches``
eval-sized batches of the digits pipeline) in a fresh subprocess per (threads, OMP_WAIT_POLICY), since the wait
policy is read when libgomp loads, before ``import torch``. Each subprocess measures the proxy alone, then again
beside one busy process (``--busy python``: a pure-Python loop, one core at 100 %; ``--busy numpy``: a one-thread
float32 matmul loop, which also loads the memory system).

Reported per configuration: s/step (median of the logged steps, from ``metrics.jsonl``'s pairs/s), s/batch of
sampling (median), the busy/alone ratio of each, and an estimate of the whole demo (300 steps + 12.5 sampling
batches + the implicit reward, which is left out: a few % of the demo), alone and beside the busy process,
with the ratio of the busy estimate to the fastest alone estimate (the issue's target: at most 2.5).

    python benchmarks/demo_threads.py --json benchmarks/results/demo_threads_cpu.json    # the full matrix (~5 min)
    python benchmarks/demo_threads.py --threads 1 --policy PASSIVE --steps 3 --batches 1  # a quick look

Timings are only meaningful on an otherwise idle machine (the busy process is the only other load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("unset", "PASSIVE")
# The demo: 300 training steps, then 400 base + 400 tuned images in batches of 64 (7 calls each, the last of 16).
DEMO_STEPS, DEMO_BATCHES = 300, 2 * 400 / 64
BUSY = {
    "python": "while True:\n    pass\n",
    "numpy": ("import os\nos.environ['OPENBLAS_NUM_THREADS'] = os.environ['OMP_NUM_THREADS'] = "
              "os.environ['MKL_NUM_THREADS'] = '1'\nimport numpy as np\na = np.random.rand(512, 512).astype(np.float32)\n"
              "while True:\n    a = (a @ a) / 512.0\n"),
}


def _train_steps(steps: int, warmup: int, out: Path) -> list[float]:
    """Seconds per optimizer step of the digits recipe, the ``steps`` after ``warmup`` (from metrics.jsonl)."""
    from accelerate.state import AcceleratorState, PartialState

    from lora_dpo.config import load_config
    from lora_dpo.training.recipe import train
    from lora_dpo.world.build import WORLD_DIR
    from lora_dpo.world.demo import DIGITS_RECIPE

    total = warmup + steps
    cfg = load_config(DIGITS_RECIPE, [
        f"model.pretrained_model_name_or_path={WORLD_DIR / 'pipeline'}",
        f"data.dataset={WORLD_DIR / 'prefs' / 'train.parquet'}", f"output.dir={out}", f"train.max_steps={total}",
        f"train.checkpoint_every={total + 1}", "train.log_every=1", "output.tensorboard=false",
        "optim.lr_warmup_steps=0",
    ])
    train(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    pairs = cfg.train.batch_size
    return [pairs / r["pairs_per_second"] for r in rows if r["step"] > warmup]


def _sample_batches(pipe, batches: int) -> list[float]:
    """Seconds per eval-sized sampling batch (64 images, 20 steps, guidance 3, 32 px) of the digits pipeline."""
    from lora_dpo.feedback.prompts import load_prompts
    from lora_dpo.inference.sampling import generate_images

    prompts = load_prompts("digits")
    times = []
    for b in range(batches):
        chunk = [prompts[i % len(prompts)] for i in range(64)]
        t0 = time.perf_counter()
        generate_images(pipe, chunk, list(range(b * 64, b * 64 + 64)), num_inference_steps=20, guidance_scale=3.0,
                        height=32, width=32, batch_size=64)
        times.append(time.perf_counter() - t0)
    return times


def _phase(pipe, args: argparse.Namespace, tmp: Path, name: str) -> dict:
    step_times = _train_steps(args.steps, args.warmup, tmp / name)
    batch_times = _sample_batches(pipe, args.batches)
    return {"step_s": statistics.median(step_times), "step_times_s": step_times,
            "batch_s": statistics.median(batch_times), "batch_times_s": batch_times}


def worker(args: argparse.Namespace) -> dict:
    """One configuration (this process's threads and wait policy): the proxy alone, then beside a busy process."""
    import torch

    from lora_dpo.inference.sampling import load_pipeline
    from lora_dpo.world.build import WORLD_DIR
    from lora_dpo.world.demo import torch_threads

    row = {"threads": args.worker_threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
           "busy": args.busy, "steps": args.steps, "batches": args.batches, "torch": torch.__version__,
           "cpus": os.cpu_count(), "parallel_info": torch.__config__.parallel_info().splitlines()[:6]}
    with torch_threads(args.worker_threads), tempfile.TemporaryDirectory() as tmp:
        pipe = load_pipeline(WORLD_DIR / "pipeline")
        _sample_batches(pipe, 1)  # warm-up: first-call allocations and kernel choices
        row["alone"] = _phase(pipe, args, Path(tmp), "alone")
        busy = subprocess.Popen([sys.executable, "-c", BUSY[args.busy]])
        try:
            time.sleep(1.0)
            row["beside_busy"] = _phase(pipe, args, Path(tmp), "busy")
        finally:
            busy.kill()
            busy.wait()
    return row


def run_matrix(args: argparse.Namespace) -> list[dict]:
    """Every (threads, policy), each in a fresh subprocess; returns the rows with the ratios and demo estimates."""
    rows = []
    for threads in args.threads:
        for policy in args.policy:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, __file__, "--worker-threads", str(threads), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batches", str(args.batches), "--busy", args.busy]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"threads": threads, "omp_wait_policy": policy, "error": proc.stderr[-2000:]})
                print(f"threads {threads}, {policy}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"threads {threads}, OMP_WAIT_POLICY {policy}: {row['wall_s']:.0f} s", file=sys.stderr)
    _add_estimates(rows)
    return rows


def _add_estimates(rows: list[dict]) -> None:
    good = [r for r in rows if "error" not in r]
    for r in good:
        for phase in ("alone", "beside_busy"):
            r[phase]["demo_estimate_s"] = DEMO_STEPS * r[phase]["step_s"] + DEMO_BATCHES * r[phase]["batch_s"]
        r["step_ratio"] = r["beside_busy"]["step_s"] / r["alone"]["step_s"]
        r["batch_ratio"] = r["beside_busy"]["batch_s"] / r["alone"]["batch_s"]
        r["demo_ratio"] = r["beside_busy"]["demo_estimate_s"] / r["alone"]["demo_estimate_s"]
    if good:
        fastest = min(r["alone"]["demo_estimate_s"] for r in good)
        for r in good:
            r["demo_busy_vs_fastest_alone"] = r["beside_busy"]["demo_estimate_s"] / fastest


def table(rows: list[dict]) -> str:
    """The markdown table of the rows."""
    lines = ["| threads | OMP_WAIT_POLICY | s/step alone | s/step busy | ratio | s/batch alone | s/batch busy | "
             "ratio | demo alone (est.) | demo busy (est.) | busy / fastest alone |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['threads']} | {r['omp_wait_policy']} | failed |" + " |" * 9)
            continue
        a, b = r["alone"], r["beside_busy"]
        lines.append(
            f"| {r['threads']} | {r['omp_wait_policy']} | {a['step_s']:.3f} | {b['step_s']:.3f} | {r['step_ratio']:.2f}"
            f" | {a['batch_s']:.2f} | {b['batch_s']:.2f} | {r['batch_ratio']:.2f} | {a['demo_estimate_s']:.0f} s"
            f" | {b['demo_estimate_s']:.0f} s | {r['demo_busy_vs_fastest_alone']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--policy", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="OMP_WAIT_POLICY of the worker: unset (libgomp's default: spin, then sleep) or PASSIVE")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first training steps per phase")
    parser.add_argument("--batches", type=int, default=2, help="timed 64-image sampling batches per phase")
    parser.add_argument("--busy", choices=sorted(BUSY), default="python", help="the busy neighbour process")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--worker-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_threads is not None:
        print(json.dumps(worker(args)))
        return 0
    rows = run_matrix(args)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
