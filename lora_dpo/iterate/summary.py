"""The record of an iterated run: one summary per round (``round_r/round.json``), the table of rounds
(``iterate.json``), its figure (``iterate.png``: win rate, classifier accuracy and diversity per round) and the lines
``lora-dpo iterate`` prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_dpo.config import RecipeConfig
from lora_dpo.evaluation.report import json_safe
from lora_dpo.feedback.prefs import atomic_path

SUMMARY_FILE = "iterate.json"
FIGURE_FILE = "iterate.png"
# The fields of an evaluation report kept per round (lora_dpo.evaluation.run.evaluate_run).
_EVAL_FIELDS = ("win_rate", "win_rate_ci95", "accuracy_base", "accuracy_tuned", "accuracy_delta_points",
                "diversity_ratio", "fixed", "broken", "n_comparisons")
_PREFS_FIELDS = ("pairs", "skipped", "mean_score", "mean_gap", "mean_best_minus_mean", "seed_range", "sampled_from")


def _first_and_last_loss(metrics_file: Path) -> tuple[float | None, float | None, float | None]:
    """The loss of the first and the last logged step of a run's ``metrics.jsonl``, and the last
    ``rewards/accuracies``."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None, None, None
    return rows[0].get("loss"), rows[-1].get("loss"), rows[-1].get("rewards/accuracies")


def _implicit(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The accuracy fields of :func:`lora_dpo.evaluation.implicit_reward.implicit_reward_accuracy`'s report."""
    if report is None:
        return None
    return {k: report[k] for k in ("accuracy", "accuracy_se_draws", "margin_mean", "n_pairs", "draws", "reference")}


def round_summary(r: int, folder: Path, prefs: dict[str, Any], evals: dict[str, Any],
                  previous: str | None) -> dict[str, Any]:
    """Round ``r``'s ``round.json``: its pairs (``prefs``: the report of
    :func:`lora_dpo.feedback.prefs.build_candidate_set`), its training (``loss_first``: the step-1 loss, ln 2 when
    the reference is the starting policy; ``loss_final``, ``reward_accuracy_final``), and ``vs_base`` /
    ``vs_previous`` (win rate with its 95% interval, classifier accuracy, diversity ratio, fixed / broken counts,
    and the held-out implicit-reward accuracy against that reference; ``vs_previous`` None in a round started
    from the base)."""
    run = folder / "train"
    loss_first, loss_final, accuracy = _first_and_last_loss(run / "metrics.jsonl")
    vs_base = {k: evals["base"].get(k) for k in _EVAL_FIELDS}
    vs_base["implicit_reward"] = _implicit(evals["implicit_base"])
    vs_previous = None
    if evals["previous"] is not None:
        vs_previous = {k: evals["previous"].get(k) for k in _EVAL_FIELDS}
        vs_previous["implicit_reward"] = _implicit(evals["implicit_previous"])
    return json_safe({
        "round": r, "reference": previous or "base", "prefs": {k: prefs.get(k) for k in _PREFS_FIELDS},
        "train": {"run_dir": str(run), "loss_first": loss_first, "loss_final": loss_final,
                  "reward_accuracy_final": accuracy},
        "vs_base": vs_base, "vs_previous": vs_previous, "adapter": str(run / "pytorch_lora_weights.safetensors"),
    })


def write_summary(run_dir: Path, cfg: RecipeConfig, rounds: list[dict[str, Any]]) -> dict[str, Path]:
    """Write ``iterate.json`` (``settings``: the recipe's ``iterate`` section; ``rounds``: the round summaries;
    ``adapter``: the final adapter) and ``iterate.png``. Returns their paths."""
    summary = {"settings": cfg.iterate.model_dump(mode="json"), "rounds": rounds,
               "adapter": str(run_dir / "pytorch_lora_weights.safetensors")}
    paths = {"summary": run_dir / SUMMARY_FILE, "figure": run_dir / FIGURE_FILE}
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    plot_rounds(rounds, paths["figure"])
    return paths


def plot_rounds(rounds: list[dict[str, Any]], out: Path) -> Path:
    """Three panels over the rounds: the win rate against the base (with its 95% interval) and against the
    previous round; the classifier accuracy of the tuned samples (the base's as a dashed line; skipped when the
    scorer does not classify); the diversity ratio tuned / base. Written to ``out`` (PNG)."""
    import matplotlib  # optional: matplotlib (plots only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: matplotlib (plots only)

    xs = [s["round"] for s in rounds]
    base = [s["vs_base"] for s in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    win = [b["win_rate"] for b in base]
    lows = [w - b["win_rate_ci95"][0] for w, b in zip(win, base)]
    highs = [b["win_rate_ci95"][1] - w for w, b in zip(win, base)]
    axes[0].errorbar(xs, win, yerr=[lows, highs], marker="o", capsize=4, label="vs base")
    previous = [(s["round"], s["vs_previous"]["win_rate"]) for s in rounds if s.get("vs_previous")]
    if previous:
        axes[0].plot(*zip(*previous), marker="s", linestyle="--", label="vs previous round")
    axes[0].axhline(0.5, color="grey", linewidth=0.8)
    axes[0].set(title="win rate (95% CI)", xlabel="round", ylim=(0, 1))
    axes[0].legend(fontsize=8)
    if base[0].get("accuracy_tuned") is not None:
        axes[1].plot(xs, [100 * b["accuracy_tuned"] for b in base], marker="o", label="tuned")
        axes[1].axhline(100 * base[0]["accuracy_base"], color="grey", linestyle="--", label="base")
        axes[1].legend(fontsize=8)
    axes[1].set(title="classifier accuracy (%)", xlabel="round")
    axes[2].plot(xs, [b["diversity_ratio"] for b in base], marker="o")
    axes[2].axhline(1.0, color="grey", linewidth=0.8)
    axes[2].set(title="diversity ratio (tuned / base)", xlabel="round", ylim=(0, 1.2))
    for ax in axes:
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_rounds(rounds: list[dict[str, Any]]) -> str:
    """The table ``lora-dpo iterate`` prints: one line per round."""
    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = ["round  pairs  loss@1  win vs base [95% CI]   vs prev  accuracy (pts)  diversity  implicit acc ± se  "
             "fixed/broken"]
    for s in rounds:
        b, p = s["vs_base"], s.get("vs_previous") or {}
        lo, hi = b["win_rate_ci95"]
        implicit = b.get("implicit_reward") or {}
        se = implicit.get("accuracy_se_draws")
        implicit_cell = num(implicit.get("accuracy"), ".3f") + (f" ± {se:.3f}" if se is not None else "")
        acc = (f"{100 * b['accuracy_tuned']:.1f}% ({b['accuracy_delta_points']:+.1f})"
               if b.get("accuracy_tuned") is not None else "n/a")
        lines.append(f"{s['round']:>5}  {s['prefs']['pairs']:>5}  {num(s['train']['loss_first'], '.4f'):>6}  "
                     f"{b['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]  {num(p.get('win_rate'), '.3f'):>7}  {acc:>14}  "
                     f"{num(b['diversity_ratio'], '.2f'):>9}  {implicit_cell:>16}  "
                     f"{num(b.get('fixed'), 'd')}/{num(b.get('broken'), 'd')}")
    return "\n".join(lines)
