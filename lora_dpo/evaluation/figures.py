"""The training curves of a run: ``metrics.jsonl`` read back, smoothed and plotted (``training_curves.png`` of
``lora-dpo eval``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CURVE_METRICS = ("loss", "rewards/accuracies", "rewards/margins")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``, one dict per logged step. Raises FileNotFoundError."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing mean: ``(N - window + 1,)``, element k = mean of ``values[k : k + window]``; empty when
    ``window`` is not in ``1..N``."""
    values = np.asarray(values, dtype=np.float64)
    if window < 1 or window > len(values):
        return np.empty(0)
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_training_curves(metrics_path: str | Path, out_path: str | Path,
                         metrics: Sequence[str] = CURVE_METRICS, title: str | None = None) -> Path:
    """Plot ``metrics`` (default loss, rewards/accuracies, rewards/margins) against step, one panel each; save
    a PNG of 420·len(metrics) × 340 pixels.

    Raw values are light points; from 5 logged steps on, a trailing moving average (window = 1/10 of the
    logged steps, at least 2) is a line on top. Dashed references: ln 2 for the loss (policy = reference),
    0.5 for the accuracy (chance), 0 for the margin. Draws on matplotlib's Agg canvas directly: no pyplot, no
    change of the global backend.

    Raises:
        FileNotFoundError: no metrics file. ValueError: it holds no rows.
    """
    # optional: matplotlib is heavy and only the training curves draw with it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} holds no logged steps")
    fig = Figure(figsize=(4.2 * len(metrics), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    references = {"loss": (math.log(2), "ln 2"), "rewards/accuracies": (0.5, "chance"),
                  "rewards/margins": (0.0, "0")}
    for ax, name in zip(axes, metrics):
        points = [(r["step"], r[name]) for r in rows
                  if "step" in r and isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            continue
        steps, values = (np.asarray(v, dtype=np.float64) for v in zip(*points))
        ax.plot(steps, values, "o", ms=2.5, alpha=0.35, color="tab:blue", label="per step")
        window = max(2, len(values) // 10)
        if len(values) >= 5:
            ax.plot(steps[window - 1:], moving_average(values, window), "-", lw=1.6, color="tab:blue",
                    label=f"moving average ({window})")
        if name in references:
            value, label = references[name]
            ax.axhline(value, ls="--", lw=0.8, color="grey", label=label)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    return out_path
