"""How many draws does the implicit-reward accuracy need, and why does it sit near 0.57 on the digits world?

Trains ``recipes/digits/lora_dpo.yaml`` (or reuses a run folder), then computes Eq. 14's margin ``u`` of every
held-out pair for ``K_max`` keyed (t, noise) draws once, with the timestep of each draw
(:func:`lora_dpo.evaluation.implicit_reward.implicit_reward_accuracy`, ``return_draws=True``). Draw k of a pair is
keyed by (seed, pair, k), so the first K of the K_max draws are exactly what ``lora-dpo eval --implicit-draws K``
draws. It reports:

- for K = 1, 2, 4, ... K_max (the first K draws): the accuracy, its standard error from the finite draws
  (:func:`~lora_dpo.evaluation.implicit_reward.draw_standard_error`, a bootstrap over each pair's draws) and its
  standard error from the finite set of pairs (binomial ``sqrt(a(1-a)/P)``): which noise dominates;
- by timestep bin: the per-draw accuracy (fraction of (pair, draw) with u > 0), the mean |u|, the mean u and the
  accuracy of the pairs judged by that bin's draws only: which timestep range carries the signal;
- by the label's score gap ``|score_0 - score_1|`` (the digit classifier's probabilities that labelled the pair):
  near-ties (< 0.01: both images right or both wrong, the label is which is more confident), middle, decisive
  (> 0.5: one right, one wrong): whether the pairs or the model limit the accuracy;
- the same at K_max on training pairs: the first 200 of ``prefs/train.parquet`` (digits 0 and 1 only: the file is
  sorted by prompt) and 200 spread over the ten prompts (20 each): train ≈ held-out says the limit is the model / β,
  train ≫ held-out says generalisation.

    python benchmarks/implicit_draws.py --json benchmarks/results/implicit_draws_cpu.json
    python benchmarks/implicit_draws.py --run-dir adapters/digits-dpo --k-max 128
    python benchmarks/implicit_draws.py --seeds 0 1 2 --work /tmp/implicit
    python benchmarks/implicit_draws.py --from-draws draws.npz --json report.json   # tables again, from --save-draws
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from lora_dpo.config import load_config
from lora_dpo.evaluation.implicit_reward import draw_standard_error, implicit_reward_accuracy
from lora_dpo.training.recipe import reset_accelerate_state, train
from lora_dpo.training.setup import torch_threads
from lora_dpo.world.build import WORLD_DIR
from lora_dpo.world.demo import DIGITS_RECIPE

HELDOUT = WORLD_DIR / "prefs" / "heldout.parquet"
TRAIN = WORLD_DIR / "prefs" / "train.parquet"
GAP_CLASSES = (("near-tie (<0.01)", 0.0, 0.01), ("middle (0.01-0.5)", 0.01, 0.5), ("decisive (>0.5)", 0.5, 2.0))
TARGET_SE = 0.01


def train_run(work: Path, seed: int, overrides: list[str]) -> tuple[Path, float]:
    """Train the digits recipe at ``train.seed=seed`` into ``work/seed<seed>``; returns ``(run_dir, seconds)``."""
    cfg = load_config(DIGITS_RECIPE, [f"model.pretrained_model_name_or_path={WORLD_DIR / 'pipeline'}",
                                      f"data.dataset={TRAIN}", f"output.dir={work / f'seed{seed}'}",
                                      f"train.seed={seed}", *overrides])
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    reset_accelerate_state()  # a later train() in this process starts afresh
    return Path(result.run_dir), seconds


def balanced_train_pairs(path: Path, per_prompt: int = 20) -> Path:
    """Write the first ``per_prompt`` training pairs of every prompt to ``path`` (same schema); returns it."""
    table = pq.read_table(TRAIN)
    captions = table.column("caption").to_pylist()
    seen: dict[str, int] = {}
    keep = []
    for i, caption in enumerate(captions):
        if seen.get(caption, 0) < per_prompt:
            seen[caption] = seen.get(caption, 0) + 1
            keep.append(i)
    pq.write_table(table.take(keep), path)
    return path


def score_gaps(pairs: Path, n: int) -> np.ndarray:
    """``|score_0 - score_1|`` of the first ``n`` pairs of ``pairs`` (file order, as the margins are)."""
    table = pq.read_table(pairs, columns=["score_0", "score_1"]).slice(0, n)
    return np.abs(np.asarray(table.column("score_0")) - np.asarray(table.column("score_1")))


def num_train_timesteps(pipeline: Path) -> float:
    """The pipeline scheduler's ``num_train_timesteps`` (t is drawn in ``[0, T)``); 1000 if it does not say."""
    config = pipeline / "scheduler" / "scheduler_config.json"
    return float(json.loads(config.read_text()).get("num_train_timesteps", 1000)) if config.is_file() else 1000.0


def by_draws(u: np.ndarray, ks: list[int], resamples: int) -> list[dict]:
    """Accuracy from the first K draws, its draw SE (bootstrap) and pair SE (binomial), for each K in ``ks``."""
    rows = []
    for k in ks:
        sub = u[:, :k]
        acc = float((sub.mean(axis=1) > 0).mean())
        rows.append({"draws": k, "accuracy": acc, "se_draws": draw_standard_error(sub, resamples=resamples),
                     "se_pairs": math.sqrt(acc * (1 - acc) / len(u)), "margin_mean": float(sub.mean()),
                     "per_draw_accuracy": float((sub > 0).mean())})
    return rows


def by_timestep(u: np.ndarray, t: np.ndarray, bins: int, t_max: float) -> list[dict]:
    """Per timestep bin over ``[0, t_max)``: draws, per-draw accuracy, mean |u|, mean and std of u, and the
    accuracy of the pairs judged by this bin's draws only (sign of the mean of their draws in the bin)."""
    edges = np.linspace(0.0, t_max, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (t >= lo) & (t < hi)
        vals = u[inside]
        counts = inside.sum(axis=1)
        has = counts > 0
        pair_mean = np.where(inside, u, 0.0).sum(axis=1)[has] / counts[has]
        rows.append({"t_lo": float(lo), "t_hi": float(hi), "n_draws": int(inside.sum()),
                     "per_draw_accuracy": float((vals > 0).mean()) if vals.size else float("nan"),
                     "mean_abs_u": float(np.abs(vals).mean()) if vals.size else float("nan"),
                     "mean_u": float(vals.mean()) if vals.size else float("nan"),
                     "std_u": float(vals.std()) if vals.size else float("nan"),
                     "n_pairs": int(has.sum()), "pair_accuracy_bin_only": float((pair_mean > 0).mean())
                     if has.any() else float("nan")})
    return rows


def by_t_floor(u: np.ndarray, t: np.ndarray, floors: tuple[float, ...] = (0, 300, 500, 700)) -> list[dict]:
    """Accuracy of the pairs judged by the mean of their draws with t >= floor only, for each floor (pairs with
    no such draw count as wrong), with its binomial SE and the mean number of draws kept per pair."""
    rows = []
    for floor in floors:
        keep = t >= floor
        counts = keep.sum(axis=1)
        mean = np.where(keep, u, 0.0).sum(axis=1) / np.maximum(counts, 1)
        acc = float(((mean > 0) & (counts > 0)).mean())
        rows.append({"t_floor": float(floor), "draws_per_pair": float(counts.mean()), "accuracy": acc,
                     "se_pairs": math.sqrt(acc * (1 - acc) / len(u))})
    return rows


def by_gap(u: np.ndarray, gaps: np.ndarray) -> list[dict]:
    """Accuracy at all draws of the pairs in each score-gap class, with its binomial SE."""
    correct = u.mean(axis=1) > 0
    rows = []
    for name, lo, hi in GAP_CLASSES:
        keep = (gaps >= lo) & (gaps < hi)
        n = int(keep.sum())
        acc = float(correct[keep].mean()) if n else float("nan")
        rows.append({"class": name, "n_pairs": n, "accuracy": acc,
                     "se_pairs": math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
                     "mean_margin": float(u[keep].mean()) if n else float("nan")})
    return rows


def extrapolate(rows: list[dict], target: float = TARGET_SE) -> dict:
    """The smallest measured K with draw SE < ``target``, and a power-law fit ``SE = c·K^(-p)`` over K >= 4
    extrapolated to the K where SE reaches ``target``."""
    measured = next((r["draws"] for r in rows if r["se_draws"] < target and r["draws"] > 1), None)
    fit = [(r["draws"], r["se_draws"]) for r in rows if r["draws"] >= 4 and r["se_draws"] > 0]
    out: dict = {"target_se": target, "smallest_k_measured": measured}
    if len(fit) >= 2:
        slope, intercept = np.polyfit(np.log([k for k, _ in fit]), np.log([s for _, s in fit]), 1)
        out.update(power=float(-slope), coefficient=float(math.exp(intercept)),
                   k_for_target=float(math.exp((math.log(target) - intercept) / slope)) if slope < 0 else None)
    return out


def analyse(run_dir: Path, pairs: Path, n_pairs: int, args) -> dict:
    """Margins of the first ``n_pairs`` of ``pairs`` at ``args.k_max`` draws, and every breakdown of them."""
    cfg = load_config(run_dir / "recipe.yaml")
    t0 = time.perf_counter()
    rep = implicit_reward_accuracy(run_dir, cfg, pairs, draws=args.k_max, max_pairs=n_pairs,
                                   batch_size=args.batch_size, return_draws=True)
    seconds = time.perf_counter() - t0
    u, t = rep["u"], rep["timesteps"]
    if rep["skipped"] or len(u) != n_pairs:
        raise RuntimeError(f"rows were skipped ({rep['skipped']}): margins no longer align with the score gaps")
    t_max = num_train_timesteps(Path(cfg.model.pretrained_model_name_or_path))
    return {"pairs": str(pairs), "margins_s": seconds, "t_max": t_max, **breakdowns(u, t, pairs, t_max, args),
            "_u": u, "_t": t}


def breakdowns(u: np.ndarray, t: np.ndarray, pairs: Path, t_max: float, args) -> dict:
    """Every table of one set from its ``(P, K)`` margins ``u`` and timesteps ``t``."""
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if k <= u.shape[1]]
    draws = by_draws(u, ks, args.resamples)
    return {"n_pairs": len(u), "k_max": u.shape[1], "by_draws": draws, "draws_needed": extrapolate(draws),
            "by_timestep": by_timestep(u, t, args.bins, t_max), "by_t_floor": by_t_floor(u, t),
            "by_score_gap": by_gap(u, score_gaps(Path(pairs), len(u)))}


def reanalyse(draws: Path, report: Path, args) -> list[dict]:
    """The results of an earlier run (its ``--json`` report and ``--save-draws`` file), every table recomputed from
    the saved margins: new breakdowns without training or forward passes again."""
    arrays = np.load(draws)
    results = json.loads(report.read_text())["results"]
    for r in results:
        for name, s in r["sets"].items():
            u, t = arrays[f"seed{r['seed']}_{name}_u"], arrays[f"seed{r['seed']}_{name}_t"]
            t_max = s.get("t_max") or num_train_timesteps(WORLD_DIR / "pipeline")
            s.update(t_max=t_max, **breakdowns(u, t, Path(s["pairs"]), t_max, args), _u=u, _t=t)
    return results


def run_seed(seed: int, run_dir: Path | None, work: Path, args) -> dict:
    """Train (unless ``run_dir`` is given) and analyse the held-out pairs and the training pairs of one seed."""
    train_s = None
    if run_dir is None:
        run_dir, train_s = train_run(work, seed, args.overrides)
    sets = {"heldout": (HELDOUT, args.pairs)}
    if "first" in args.train_sets:
        sets["train_first"] = (TRAIN, args.pairs)
    if "balanced" in args.train_sets:
        sets["train_balanced"] = (balanced_train_pairs(work / "train_balanced.parquet", args.pairs // 10), args.pairs)
    out = {"seed": seed, "run_dir": str(run_dir), "train_s": train_s, "sets": {}}
    for name, (pairs, n) in sets.items():
        out["sets"][name] = analyse(run_dir, pairs, n, args)
        print(f"seed {seed} {name}: {out['sets'][name]['margins_s']:.0f} s", flush=True)
    return out


def print_tables(result: dict) -> None:
    """The draws table (held-out), the timestep table (held-out) and the train / held-out / score-gap table."""
    held = result["sets"]["heldout"]
    print(f"\n### seed {result['seed']}: held-out pairs ({held['n_pairs']}), accuracy vs draws K\n")
    print("| K | accuracy | SE over draws (bootstrap) | SE over pairs (binomial) | per-draw accuracy | mean u |")
    print("|---|---|---|---|---|---|")
    for r in held["by_draws"]:
        print(f"| {r['draws']} | {r['accuracy']:.3f} | {r['se_draws']:.4f} | {r['se_pairs']:.4f} | "
              f"{r['per_draw_accuracy']:.3f} | {r['margin_mean']:+.4f} |")
    need = held["draws_needed"]
    print(f"\ndraw SE < {need['target_se']}: smallest measured K = {need['smallest_k_measured']}; "
          f"fit SE = {need.get('coefficient', float('nan')):.3f}·K^(-{need.get('power', float('nan')):.2f}) "
          f"-> K ≈ {need.get('k_for_target') or float('nan'):.0f}")
    print(f"\n### seed {result['seed']}: held-out, by timestep of the draw (K = {held['k_max']})\n")
    print("| t | draws | per-draw accuracy | mean abs(u) | mean u | std u | pair accuracy from this bin's draws |")
    print("|---|---|---|---|---|---|---|")
    for r in held["by_timestep"]:
        print(f"| [{r['t_lo']:.0f}, {r['t_hi']:.0f}) | {r['n_draws']} | {r['per_draw_accuracy']:.3f} | "
              f"{r['mean_abs_u']:.4f} | {r['mean_u']:+.4f} | {r['std_u']:.4f} | {r['pair_accuracy_bin_only']:.3f} |")
    print(f"\n### seed {result['seed']}: accuracy at K = {held['k_max']} from the draws with t >= floor only\n")
    print("| pairs | " + " | ".join(f"t >= {r['t_floor']:.0f}" for r in held["by_t_floor"]) + " |")
    print("|---|" + "---|" * len(held["by_t_floor"]))
    for name, s in result["sets"].items():
        print(f"| {name} | " + " | ".join(f"{r['accuracy']:.3f} ± {r['se_pairs']:.3f}" for r in s["by_t_floor"]) + " |")
    print(f"\n### seed {result['seed']}: accuracy at K = {held['k_max']} by pair set and label score gap\n")
    print("| pairs | all: accuracy ± SE pairs (SE draws) | " + " | ".join(c for c, _, _ in GAP_CLASSES) + " |")
    print("|---|---|" + "---|" * len(GAP_CLASSES))
    for name, s in result["sets"].items():
        last = s["by_draws"][-1]
        gaps = " | ".join(f"{g['accuracy']:.3f} ± {g['se_pairs']:.3f} (n={g['n_pairs']})" for g in s["by_score_gap"])
        print(f"| {name} ({s['n_pairs']}) | {last['accuracy']:.3f} ± {last['se_pairs']:.3f} ({last['se_draws']:.4f}) "
              f"| {gaps} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for training (section.key=value)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each run")
    parser.add_argument("--run-dir", type=Path, nargs="+", help="trained run folder(s) to reuse, one per seed")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--k-max", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=200, help="pairs per set (held-out: the first ones)")
    parser.add_argument("--train-sets", nargs="*", choices=["first", "balanced"], default=["first", "balanced"])
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=50, help="pairs per forward (results do not depend on it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-draws", type=Path, help="write every set's (P, K) margins and timesteps (.npz)")
    parser.add_argument("--from-draws", type=Path, help="recompute the tables from a --save-draws file and the "
                        "--json report of the same run (rewritten), without training or forward passes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.run_dir and len(args.run_dir) != len(args.seeds):
        parser.error("--run-dir needs one folder per --seeds entry")
    if args.from_draws and not (args.json and args.json.is_file()):
        parser.error("--from-draws needs --json: the report of the run that saved the draws")
    with tempfile.TemporaryDirectory() as tmp, torch_threads(args.threads) as threads:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = reanalyse(args.from_draws, args.json, args) if args.from_draws else [
            run_seed(seed, args.run_dir[i] if args.run_dir else None, work, args) for i, seed in enumerate(args.seeds)]
    arrays = {}
    for r in results:
        for name, s in r["sets"].items():
            arrays[f"seed{r['seed']}_{name}_u"], arrays[f"seed{r['seed']}_{name}_t"] = s.pop("_u"), s.pop("_t")
        print_tables(r)
    if args.save_draws:
        np.savez_compressed(args.save_draws, **arrays)
    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
                   "torch": torch.__version__, "torch_threads": threads, "device": "cpu"}
        run_args = {k: str(v) for k, v in vars(args).items()}
        report = {"machine": machine, "args": run_args}
        if args.from_draws:  # the margins' run keeps its machine and arguments; the reanalysis is recorded beside
            report = {**json.loads(args.json.read_text()), "reanalysis": run_args}
            report.pop("results")
        args.json.write_text(json.dumps({**report, "results": results}, indent=2))


if __name__ == "__main__":
    main()
