"""Pictures of an evaluation: the side-by-side grid (base row above tuned row, same seeds) and training curves."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CURVE_METRICS = ("loss", "rewards/accuracies", "rewards/margins")
# Grid layout, in pixels: a label strip above each prompt's two rows, a column of row names on the left.
LABEL_HEIGHT = 16
SIDE_WIDTH = 44
TILE_TARGET = 96  # small images are enlarged (NEAREST, by an integer factor) to about this size
MAX_TILE = 256  # large images are shrunk to this size


def tile_size(side: int) -> int:
    """Grid tile size for images of ``side`` pixels: small images grow by an integer factor to about
    :data:`TILE_TARGET` (32 -> 96), large ones shrink to :data:`MAX_TILE`, the rest keep their size."""
    if side < TILE_TARGET:
        return side * max(1, TILE_TARGET // side)
    return min(side, MAX_TILE)


def grid_size(n_prompts: int, n_cols: int, tile: int, label_height: int = LABEL_HEIGHT,
              side_width: int = SIDE_WIDTH) -> tuple[int, int]:
    """``(width, height)`` of :func:`make_grid`'s picture: ``side_width + n_cols·tile`` by
    ``n_prompts·(label_height + 2·tile)`` (per prompt: a label strip, the base row, the tuned row)."""
    return side_width + n_cols * tile, n_prompts * (label_height + 2 * tile)


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def make_grid(prompts: Sequence[str], base_rows: Sequence[Sequence[Image.Image]],
              tuned_rows: Sequence[Sequence[Image.Image]], *, tile: int | None = None) -> Image.Image:
    """Side-by-side picture: for each prompt, its text on a grey strip, then the base row, then the tuned row.

    Column j of both rows should come from the same seed. Tiles are resized to ``tile`` pixels (default
    :func:`tile_size` of the first image): NEAREST when enlarging (pixels stay crisp), LANCZOS when shrinking.
    The row names (``base``, ``tuned``) sit in a left column. Size: exactly :func:`grid_size` ``(len(prompts),
    longest row, tile)``.

    Raises:
        ValueError: the numbers of prompts, base rows and tuned rows differ, or the rows hold no image.
    """
    from PIL import ImageDraw, ImageFont

    if not (len(prompts) == len(base_rows) == len(tuned_rows)) or not prompts:
        raise ValueError(f"{len(prompts)} prompts, {len(base_rows)} base rows, {len(tuned_rows)} tuned rows: "
                         "need one base and one tuned row per prompt")
    images = [im for row in (*base_rows, *tuned_rows) for im in row]
    if not images:
        raise ValueError("the rows hold no image")
    n_cols = max(len(row) for row in (*base_rows, *tuned_rows))
    tile = tile or tile_size(max(images[0].size))
    width, height = grid_size(len(prompts), n_cols, tile)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, prompt in enumerate(prompts):
        y0 = i * (LABEL_HEIGHT + 2 * tile)
        draw.rectangle((0, y0, width - 1, y0 + LABEL_HEIGHT - 1), fill=(228, 228, 228))
        draw.text((4, y0 + 2), _fit_text(draw, prompt, font, width - 8), fill=(0, 0, 0), font=font)
        for r, (name, row) in enumerate((("base", base_rows[i]), ("tuned", tuned_rows[i]))):
            y = y0 + LABEL_HEIGHT + r * tile
            draw.text((4, y + tile // 2 - 6), name, fill=(0, 0, 0), font=font)
            for j, im in enumerate(row):
                resample = Image.Resampling.NEAREST if tile >= max(im.size) else Image.Resampling.LANCZOS
                canvas.paste(im.convert("RGB").resize((tile, tile), resample), (SIDE_WIDTH + j * tile, y))
    return canvas


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


