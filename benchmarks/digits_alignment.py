"""Does DPO align the digits world? LoRA-DPO against the SFT baseline, on the same pairs, steps and seeds.

Trains ``recipes/digits/lora_dpo.yaml`` and ``recipes/digits/sft.yaml`` (same preference pairs, same number of
steps, same batch and seed), evaluates each with ``lora-dpo eval`` on held-out prompt × seed comparisons against
the base model (the same seeds for base and tuned), and prints the issue's targets:

- DPO beats the base in at least 75% of comparisons (ties count half); 95% Wilson interval given;
- classifier accuracy of the samples rises by at least 15 points;
- diversity ratio (tuned / base mean pairwise distance between the images of one prompt) at least 0.8;
- DPO beats SFT (win rate and accuracy);
- implicit-reward accuracy on the held-out preference pairs at least 65%.

    python benchmarks/digits_alignment.py                       # 10 prompts × 40 seeds = 400 comparisons each
    python benchmarks/digits_alignment.py --seeds-per-prompt 60 --json results.json train.max_steps=500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"dpo": ROOT / "recipes/digits/lora_dpo.yaml", "sft": ROOT / "recipes/digits/sft.yaml"}


def run(name: str, overrides: list[str], args) -> dict:
    from lora_dpo.world.demo import train_and_evaluate

    _, report = train_and_evaluate(RECIPES[name], [f"output.dir={args.out / name}", *overrides],
                                   args.seeds_per_prompt)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to both runs (section.key=value)")
    parser.add_argument("--seeds-per-prompt", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "adapters" / "bench-digits")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    reports = {name: run(name, args.overrides, args) for name in ("dpo", "sft")}
    print("| run | comparisons | win rate vs base [95% CI] | accuracy base → tuned | diversity ratio | "
          "implicit-reward acc. | reward base → tuned | train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in reports.items():
        lo, hi = r["win_rate_ci95"]
        implicit = r.get("implicit_reward") or {}
        print(f"| {name} | {r['n_comparisons']} | {r['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | "
              f"{100 * r['accuracy_base']:.1f}% → {100 * r['accuracy_tuned']:.1f}% | {r['diversity_ratio']:.3f} | "
              f"{implicit.get('accuracy', float('nan')):.3f} | {r['reward_base_mean']:.3f} → "
              f"{r['reward_tuned_mean']:.3f} | {r['train_time_s']:.0f} |")
    dpo, sft = reports["dpo"], reports["sft"]
    targets = {
        "comparisons >= 400": dpo["n_comparisons"] >= 400,
        "DPO win rate >= 0.75": dpo["win_rate"] >= 0.75,
        "accuracy +15 points": dpo["accuracy_delta_points"] >= 15,
        "diversity ratio >= 0.8": dpo["diversity_ratio"] >= 0.8,
        "DPO beats SFT (win rate and accuracy)": dpo["win_rate"] > sft["win_rate"]
        and dpo["accuracy_tuned"] > sft["accuracy_tuned"],
        "implicit-reward accuracy >= 0.65": (dpo.get("implicit_reward") or {}).get("accuracy", 0) >= 0.65,
    }
    print()
    for name, ok in targets.items():
        print(f"- {'met' if ok else 'MISSED'}: {name}")
    if args.json:
        args.json.write_text(json.dumps({"reports": reports, "targets": targets}, indent=2, default=str))


if __name__ == "__main__":
    main()
