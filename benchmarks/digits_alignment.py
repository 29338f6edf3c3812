"""Does DPO align the digits world? LoRA-DPO against the SFT baseline, on the same pairs, steps and seeds.

Trains ``recipes/digits/lora_dpo.yaml`` and ``recipes/digits/sft.yaml`` (same preference pairs, same number of
steps, same batch and seed), evaluates each with ``lora-dpo eval`` on held-out prompt × seed comparisons against
the base model (the same seeds for base and tuned), and prints the issue's targets:

- DPO beats the base in at least 75% of comparisons (ties count half); 95% Wilson interval given;
- classifier accuracy of the samples rises by at least 15 points;
- diversity ratio (tuned / base mean pairwise distance between the images of one prompt) at least 0.8;
- DPO beats SFT (win rate and accuracy);
- implicit-reward accuracy on the held-out preference pairs at least 65%.

The same on the SD3-layout world (Flow-DPO on a small transformer, ``recipes/digits-sd3``), with the σ density as
an override, and the saved results of several train seeds as one table with their means:

    python benchmarks/digits_alignment.py                       # 10 prompts × 40 seeds = 400 comparisons each
    python benchmarks/digits_alignment.py --seeds-per-prompt 60 --json results.json train.max_steps=500
    python benchmarks/digits_alignment.py train.seed=1 --world digits-sd3 --json sd3_seed1.json
    python benchmarks/digits_alignment.py model.weighting_scheme=uniform --world digits-sd3 --only dpo --json u.json
    python benchmarks/digits_alignment.py --table sd3_seed0.json sd3_seed1.json sd3_seed2.json

Overrides (``section.key=value``) come before the options.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"dpo": "lora_dpo", "sft": "sft"}  # run name -> recipe in recipes/<world>/
HEADER = ("| run | train seed | comparisons | win rate vs base [95% CI] | accuracy base → tuned | diversity ratio | "
          "implicit-reward acc. | reward base → tuned | train time (s) |\n|---|---|---|---|---|---|---|---|---|")


def run(name: str, overrides: list[str], args) -> dict:
    from lora_dpo.world.demo import train_and_evaluate
    from lora_dpo.world.worlds import get_world

    recipe = get_world(args.world).recipe(RUNS[name])
    _, report = train_and_evaluate(recipe, [f"output.dir={args.out / args.world / name}", *overrides],
                                   args.seeds_per_prompt, world=args.world)
    return report


def _row(name: str, seed, r: dict) -> str:
    lo, hi = r["win_rate_ci95"]
    implicit = r.get("implicit_reward") or {}
    return (f"| {name} | {seed} | {r['n_comparisons']} | {r['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{100 * r['accuracy_base']:.1f}% → {100 * r['accuracy_tuned']:.1f}% | {r['diversity_ratio']:.3f} | "
            f"{implicit.get('accuracy', float('nan')):.3f} | {r['reward_base_mean']:.3f} → "
            f"{r['reward_tuned_mean']:.3f} | {r['train_time_s']:.0f} |")


def _targets(by_seed: list[dict]) -> dict[str, bool]:
    """The issue's targets over the train seeds: the means for DPO against the base, every seed for DPO vs SFT.
    None without DPO runs (an ``--only sft`` result)."""
    if not all("dpo" in r for r in by_seed):
        return {}
    dpo = [r["dpo"] for r in by_seed]
    mean = {k: sum(r[k] for r in dpo) / len(dpo) for k in ("win_rate", "accuracy_delta_points", "diversity_ratio")}
    implicit = [(r.get("implicit_reward") or {}).get("accuracy", 0.0) for r in dpo]
    targets = {
        "comparisons >= 400": all(r["n_comparisons"] >= 400 for r in dpo),
        "DPO win rate >= 0.75 (mean)": mean["win_rate"] >= 0.75,
        "accuracy +15 points (mean)": mean["accuracy_delta_points"] >= 15,
        "diversity ratio >= 0.8 (mean)": mean["diversity_ratio"] >= 0.8,
        "implicit-reward accuracy >= 0.65 (mean)": sum(implicit) / len(implicit) >= 0.65,
    }
    if all("sft" in r for r in by_seed):
        targets["DPO beats SFT at every seed (win rate and accuracy)"] = all(
            r["dpo"]["win_rate"] > r["sft"]["win_rate"] and r["dpo"]["accuracy_tuned"] > r["sft"]["accuracy_tuned"]
            for r in by_seed)
    return targets


def print_table(results: list[dict]) -> dict[str, bool]:
    """Print each result file's rows, the means over them per run, and the targets; return the targets."""
    print(HEADER)
    for result in results:
        for name, report in result["reports"].items():
            print(_row(name, result.get("train_seed", "?"), report))
    for name in RUNS:
        rows = [r["reports"][name] for r in results if name in r["reports"]]
        if len(rows) > 1:
            keys = ("win_rate", "accuracy_base", "accuracy_tuned", "diversity_ratio")
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
            implicit = [(r.get("implicit_reward") or {}).get("accuracy", float("nan")) for r in rows]
            print(f"| {name}, mean of {len(rows)} | | | {mean['win_rate']:.3f} | {100 * mean['accuracy_base']:.1f}% → "
                  f"{100 * mean['accuracy_tuned']:.1f}% | {mean['diversity_ratio']:.3f} | "
                  f"{sum(implicit) / len(implicit):.3f} | | |")
    targets = _targets([r["reports"] for r in results])
    print()
    for name, ok in targets.items():
        print(f"- {'met' if ok else 'MISSED'}: {name}")
    return targets


def merge_by_seed(results: list[dict]) -> list[dict]:
    """One result per train seed: the runs of files of the same seed (e.g. a ``--only dpo`` file and a
    ``--only sft`` file) joined, in the order the seeds first appear."""
    merged: dict = {}
    for result in results:
        seed = result.get("train_seed", f"file {len(merged)}")  # older files carry no seed: each stands alone
        entry = merged.setdefault(seed, {**result, "reports": {}})
        entry["reports"].update(result["reports"])
    return list(merged.values())


def _train_seed(overrides: list[str]) -> int:
    seeds = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.seed=")]
    return seeds[-1] if seeds else 0  # the recipes' seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to both runs (section.key=value)")
    parser.add_argument("--world", default="digits", help="digits (SD1.5 layout) or digits-sd3 (default digits)")
    parser.add_argument("--only", choices=tuple(RUNS), help="run only DPO or only SFT")
    parser.add_argument("--seeds-per-prompt", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "adapters" / "bench-digits")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="print saved --json results (one per train seed)")
    args = parser.parse_args()
    if args.table:
        print_table(merge_by_seed([json.loads(path.read_text()) for path in args.table]))
        return

    reports = {name: run(name, args.overrides, args) for name in RUNS if args.only in (None, name)}
    result = {"world": args.world, "train_seed": _train_seed(args.overrides), "overrides": args.overrides,
              "reports": reports}
    result["targets"] = print_table([result])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
