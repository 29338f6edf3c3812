"""The numbers of an evaluation, from the scores of its base and tuned images, and the lines ``lora-dpo eval`` prints.

:func:`comparison_stats` turns the per-comparison scores into the report's reward, win-rate, accuracy and
diversity fields (:mod:`lora_dpo.evaluation.stats`); :func:`digit_changes` lists the comparisons the tuning fixed
or broke (digit scorers); :func:`json_safe` makes a report JSON-clean; and :func:`format_summary` prints one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from lora_dpo.evaluation.stats import (
    CI_METHOD,
    DIVERSITY_METHOD,
    bootstrap_interval,
    diversity,
    mean_pairwise_l2,
    wilson_interval,
)

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """The scores of N comparisons (prompt-major: comparison i is prompt ``i // seeds_per_prompt``).

    ``base``, ``tuned``: ``(N,)`` float64 rewards; ``outcomes``: ``(N,)`` tuned vs base, 1 / 0.5 / 0
    (:func:`lora_dpo.evaluation.stats.win_outcomes`); ``correct_base``, ``correct_tuned``: ``(N,)`` bool, the
    image classified as its prompt's digit, or None when the scorer does not classify digits.
    """

    base: np.ndarray
    tuned: np.ndarray
    outcomes: np.ndarray
    correct_base: np.ndarray | None = None
    correct_tuned: np.ndarray | None = None


def comparison_stats(scores: Scores, base_images: Sequence[Image.Image], tuned_images: Sequence[Image.Image],
                     groups: Sequence[int]) -> dict[str, Any]:
    """The report's fields from ``n_comparisons`` to ``diversity_method`` (see
    :func:`lora_dpo.evaluation.run.evaluate_run`); ``groups``: the prompt index of each image. Logs a warning
    when every tuned image equals its base image."""
    outcomes = scores.outcomes
    n = len(outcomes)
    wins, ties = int((outcomes == 1).sum()), int((outcomes == 0.5).sum())
    identical = sum(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base_images, tuned_images))
    if identical == n:
        log.warning("every tuned image equals its base image: the adapter has no visible effect")
    div_base, div_tuned = diversity(base_images, groups), diversity(tuned_images, groups)
    acc_base = float(scores.correct_base.mean()) if scores.correct_base is not None else None
    acc_tuned = float(scores.correct_tuned.mean()) if scores.correct_tuned is not None else None
    return {
        "n_comparisons": n,
        "reward_base_mean": float(scores.base.mean()), "reward_base_std": float(scores.base.std()),
        "reward_tuned_mean": float(scores.tuned.mean()), "reward_tuned_std": float(scores.tuned.std()),
        "reward_delta_mean": float((scores.tuned - scores.base).mean()),
        "win_rate": float(outcomes.mean()),
        "win_rate_ci95": list(wilson_interval(float(outcomes.sum()), n)),
        "win_rate_ci95_bootstrap": list(bootstrap_interval(outcomes)),
        "win_rate_ci_method": CI_METHOD,
        "wins": wins, "ties": ties, "losses": n - wins - ties, "identical_images": int(identical),
        "accuracy_base": acc_base, "accuracy_tuned": acc_tuned,
        "accuracy_delta_points": 100.0 * (acc_tuned - acc_base) if acc_base is not None else None,
        "diversity_base": div_base, "diversity_tuned": div_tuned,
        "diversity_ratio": div_tuned / div_base if div_base > 0 else float("nan"),
        "diversity_method": DIVERSITY_METHOD,
    }


def change_marks(scores: Scores) -> list[str | None] | None:
    """Per comparison (``(N,)``, prompt-major): ``"fixed"`` where the tuned image is read as the prompted digit and
    the base image is not, ``"broken"`` for the reverse, None where both or neither are; None when the scorer does
    not classify digits (``correct_base`` is None)."""
    if scores.correct_base is None or scores.correct_tuned is None:
        return None
    return ["fixed" if tuned and not base else "broken" if base and not tuned else None
            for base, tuned in zip(scores.correct_base.tolist(), scores.correct_tuned.tolist())]


def digit_changes(scores: Scores, flat_prompts: Sequence[str], flat_seeds: Sequence[int]) -> dict[str, Any]:
    """The report's ``fixed``, ``broken`` (counts) and ``fixed_comparisons``, ``broken_comparisons`` (lists of
    ``{"prompt", "seed"}``, in comparison order) from :func:`change_marks`; all four None when the scorer does not
    classify digits. ``flat_prompts``, ``flat_seeds``: the prompt and seed of each of the N comparisons.

    Raises:
        ValueError: ``flat_prompts`` or ``flat_seeds`` is not N long.
    """
    marks = change_marks(scores)
    if marks is None:
        return {"fixed": None, "broken": None, "fixed_comparisons": None, "broken_comparisons": None}
    if not len(flat_prompts) == len(flat_seeds) == len(marks):
        raise ValueError(f"{len(flat_prompts)} prompts and {len(flat_seeds)} seeds for {len(marks)} comparisons")
    lists: dict[str, list[dict[str, Any]]] = {"fixed": [], "broken": []}
    for mark, prompt, seed in zip(marks, flat_prompts, flat_seeds):
        if mark is not None:
            lists[mark].append({"prompt": prompt, "seed": int(seed)})
    return {"fixed": len(lists["fixed"]), "broken": len(lists["broken"]),
            "fixed_comparisons": lists["fixed"], "broken_comparisons": lists["broken"]}


def per_prompt_stats(prompts: Sequence[str], seeds_per_prompt: int, scores: Scores,
                     base_images: Sequence[Image.Image], tuned_images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """One entry per prompt: its win rate, mean rewards, diversities and (digit scorers) accuracies."""
    per_prompt = []
    for i, prompt in enumerate(prompts):
        sl = slice(i * seeds_per_prompt, (i + 1) * seeds_per_prompt)
        entry = {
            "prompt": prompt, "win_rate": float(scores.outcomes[sl].mean()),
            "reward_base_mean": float(scores.base[sl].mean()),
            "reward_tuned_mean": float(scores.tuned[sl].mean()),
            "diversity_base": mean_pairwise_l2(base_images[sl]),
            "diversity_tuned": mean_pairwise_l2(tuned_images[sl]),
        }
        if scores.correct_base is not None:
            entry["accuracy_base"] = float(scores.correct_base[sl].mean())
            entry["accuracy_tuned"] = float(scores.correct_tuned[sl].mean())
        per_prompt.append(entry)
    return per_prompt


def json_safe(value: Any) -> Any:
    """NaN/Inf -> None, numpy scalars -> Python numbers, tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines from an :func:`lora_dpo.evaluation.run.evaluate_run` report (what
    ``lora-dpo eval`` prints): the settings (and ``against <adapter>`` with a reference adapter), reward, win rate,
    accuracy and the fixed / broken counts (digit scorers), diversity, implicit reward, the files written."""

    def num(value: Any, fmt: str = ".3f") -> str:
        return "n/a" if value is None else format(value, fmt)

    s = report["settings"]
    lo, hi = report["win_rate_ci95"]
    against = f" against {s['reference_adapter']}" if s.get("reference_adapter") else ""
    lines = [
        f"eval of {report['run_dir']}{against}: {report['n_comparisons']} comparisons ({len(s['prompts'])} prompts x "
        f"{s['seeds_per_prompt']} seeds from {s['seed_offset']}), scorer {s['scorer']}, "
        f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']}",
        f"  reward     base {num(report['reward_base_mean'])} ± {num(report['reward_base_std'])}  ->  tuned "
        f"{num(report['reward_tuned_mean'])} ± {num(report['reward_tuned_std'])}",
        f"  win rate   {num(report['win_rate'])}, 95% CI [{num(lo)}, {num(hi)}] (Wilson; wins "
        f"{report['wins']}, ties {report['ties']}, losses {report['losses']})",
    ]
    if report["accuracy_base"] is not None:
        lines.append(f"  accuracy   {100 * report['accuracy_base']:.1f}%  ->  "
                     f"{100 * report['accuracy_tuned']:.1f}% ({report['accuracy_delta_points']:+.1f} points)")
    if report.get("fixed") is not None:
        lines.append(f"  fixed {report['fixed']}, broken {report['broken']} (tuned read as the prompted digit and "
                     "base not / the reverse)")
    lines.append(f"  diversity  base {num(report['diversity_base'])}, tuned "
                 f"{num(report['diversity_tuned'])}, ratio tuned/base {num(report['diversity_ratio'])}")
    implicit = report.get("implicit_reward")
    if implicit:
        se = implicit.get("accuracy_se_draws")
        lines.append(f"  implicit-reward accuracy {num(implicit['accuracy'])}"
                     + (f" ± {se:.3f} (draws)" if se is not None else "")
                     + f" on {implicit['n_pairs']} held-out pairs (K={implicit['draws']}), mean margin "
                     f"{num(implicit['margin_mean'], '.4g')}")
    files = report["files"]
    lines.append(f"  report: {files['eval_json']}")
    for key, label in (("grid", "grid:  "), ("changes_grid", "changes:"), ("training_curves", "curves:")):
        if files.get(key):
            lines.append(f"  {label} {files[key]}")
    return "\n".join(lines)
