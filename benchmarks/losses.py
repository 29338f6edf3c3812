"""The preference-loss family side by side on the digits world: same pairs, steps, batch, seed and learning rate.

Each variant trains ``recipes/digits/lora_dpo.yaml`` (LoRA rank 8, 300 steps of 32 pairs, lr 1e-3, seed 0) with
only ``loss.*`` changed (SFT: ``recipes/digits/sft.yaml``, the same pairs' preferred images), then is evaluated
like ``benchmarks/digits_alignment.py``: 400 held-out prompt × seed comparisons against the base model (win rate
with its 95% Wilson interval, classifier reward and accuracy, diversity ratio) and the implicit-reward accuracy on
the held-out pairs. The step time is the training wall time over the steps (2-core CPU unless run elsewhere).

Hyperparameters are each paper's where it gives one for diffusion (MaPO β 0.1, α 0.5; SDPO μ 0.9, its SD1.5
launcher), else the digits recipe's β 250 (IPO's τ and the hinge's β share Diffusion-DPO's scale here). KTO trains on
the same pairs read as labeled images (preferred: desirable), 64 images per step; its β at two scales (see VARIANTS).

    python benchmarks/losses.py --json benchmarks/results/losses_cpu.json
    python benchmarks/losses.py --only sigmoid mapo --seeds-per-prompt 20
    python benchmarks/losses.py --only kto --json benchmarks/results/losses_cpu.json   # updates the kto rows
    python benchmarks/losses.py --world digits-sd3 --json benchmarks/results/losses_digits_sd3_cpu.json

``--world digits-sd3`` runs the same variants on the SD3-layout world with its recipes (``recipes/digits-sd3``:
Flow-DPO, the velocity errors), so the β-scaled hyperparameters take that recipe's β.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DPO, SFT = "lora_dpo", "sft"  # the recipes of the world: recipes/<world>/<name>.yaml
VARIANTS = {
    "sigmoid": (DPO, []),
    "sigmoid + label smoothing 0.1": (DPO, ["loss.label_smoothing=0.1"]),
    "sigmoid + SDPO μ 0.9": (DPO, ["loss.sdpo_mu=0.9"]),
    "sigmoid + SFT anchor 1.0": (DPO, ["loss.sft_weight=1.0"]),
    "ipo": (DPO, ["loss.type=ipo"]),
    "hinge": (DPO, ["loss.type=hinge"]),
    "mapo": (DPO, ["loss.type=mapo"]),
    # KTO reads each pair as two labeled images; 64 images per step are the 32 pairs' images. β 500 gives a fresh
    # adapter the per-image gradient of Diffusion-DPO at β 250 (β/4 per image over 64 images vs β/4 per pair's error
    # over 32 pairs); β 50 keeps the ratio of the official defaults (KTO 1000 vs DPO 5000 with its 0.5, a tenth).
    "kto β 500": (DPO, ["loss.type=kto", "loss.kto_beta=500", "train.batch_size=64"]),
    "kto β 50": (DPO, ["loss.type=kto", "loss.kto_beta=50", "train.batch_size=64"]),
    "sft": (SFT, []),
}


def main() -> None:
    from lora_dpo.world.demo import train_and_evaluate
    from lora_dpo.world.worlds import get_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to every run (section.key=value)")
    parser.add_argument("--only", nargs="+", help="variant names (the part before any space) to run")
    parser.add_argument("--seeds-per-prompt", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "adapters" / "bench-losses")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--world", default="digits", help="digits (SD1.5 layout, default) or digits-sd3")
    args = parser.parse_args()

    rows = {}
    for name, (recipe, options) in VARIANTS.items():
        if args.only and name.split(" ")[0] not in args.only and name not in args.only:
            continue
        folder = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")  # e.g. "kto-500", "sigmoid-SDPO-0.9"
        result, report = train_and_evaluate(get_world(args.world).recipe(recipe),
                                            [f"output.dir={args.out / args.world / folder}", *options, *args.overrides],
                                            args.seeds_per_prompt, world=args.world)
        report["step_time_s"] = report["train_time_s"] / result.step
        report["final_train_metrics"] = result.final_metrics
        rows[name] = report
        print(f"{name}: win {report['win_rate']:.3f}", flush=True)

    print("| loss | win rate vs base [95% CI] | reward base → tuned | accuracy base → tuned | diversity ratio | "
          "implicit-reward acc. | step time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        lo, hi = r["win_rate_ci95"]
        implicit = (r.get("implicit_reward") or {}).get("accuracy", float("nan"))
        print(f"| {name} | {r['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {r['reward_base_mean']:.3f} → "
              f"{r['reward_tuned_mean']:.3f} | {100 * r['accuracy_base']:.1f}% → {100 * r['accuracy_tuned']:.1f}% | "
              f"{r['diversity_ratio']:.3f} | {implicit:.3f} | {r['step_time_s']:.3f} |")
    if args.json:  # the variants run replace their rows in an existing file, the others are kept
        kept = json.loads(args.json.read_text()) if args.json.is_file() else {}
        args.json.write_text(json.dumps({**kept, **rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
