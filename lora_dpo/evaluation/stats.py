"""Statistics of an evaluation: win rates with confidence intervals, and image diversity.

Wallace et al. 2023 (arXiv 2311.12908) §5.3 judge Diffusion-DPO against its base model by win rates; the diversity
ratio (tuned / base) flags mode collapse, the usual failure of reward over-optimisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 2000
CI_METHOD = (
    "win_rate_ci95: Wilson score interval (95%), ties counted as half a win; win_rate_ci95_bootstrap: "
    f"percentile bootstrap over the prompt x seed comparisons ({BOOTSTRAP_RESAMPLES} resamples, seed 0). "
    "Both treat the comparisons as independent."
)
DIVERSITY_METHOD = ("mean pairwise L2 distance between the images of one prompt (flattened, pixels in "
                    "[0, 1]), averaged over prompts")


def win_outcomes(tuned: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-comparison outcome of tuned vs base: 1 (tuned scores higher), 0.5 (equal), 0 (lower).

    Args:
        tuned, base: ``(N,)`` scores of the same N comparisons (same prompt and seed at each index).
    Returns:
        ``(N,)`` float64.
    Raises:
        ValueError: shapes differ or are not ``(N,)`` with N ≥ 1.
    """
    tuned, base = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if tuned.ndim != 1 or tuned.shape != base.shape or tuned.size == 0:
        raise ValueError(f"tuned {tuned.shape} and base {base.shape} must be non-empty (N,), of one length")
    return np.where(tuned > base, 1.0, np.where(tuned == base, 0.5, 0.0))


def win_rate(tuned: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray) -> float:
    """Fraction of comparisons where tuned scores higher than base, ties counting half (in [0, 1])."""
    return float(win_outcomes(tuned, base).mean())


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for the proportion ``successes / n`` (Wilson 1927), 95% by default.

    ``successes`` may be fractional (a tie counts 0.5), which makes the interval slightly conservative.
    Unlike the normal approximation it stays inside [0, 1] and does not collapse at the extremes: n wins out
    of n give ``[n / (n + z²), 1]``.

    Raises:
        ValueError: n < 1, or successes outside [0, n].
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_interval(values: Sequence[float] | np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (``(N,)``), resampling the N values.

    Deterministic for a given seed. Degenerate at the extremes (N equal values give a zero-width interval):
    for small N or win rates near 0 or 1 prefer :func:`wilson_interval`.

    Raises:
        ValueError: ``values`` is empty or not 1-D.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty (N,) array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def images_to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """PIL images of one size -> ``(N, H, W, 3)`` float32, pixels in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def mean_pairwise_l2(images: Sequence[Image.Image] | np.ndarray) -> float:
    """Mean L2 distance over all unordered pairs of images (flattened, pixels in [0, 1]).

    Units: a Euclidean norm over H·W·3 values, so a black and a white image are ``sqrt(3·H·W)`` apart (55.4
    at 32 px) and identical images 0. NaN for fewer than two images.

    Args:
        images: PIL images of one size, or an ``(N, H, W, C)`` array already in [0, 1].
    """
    arr = images if isinstance(images, np.ndarray) else images_to_array(images)
    flat = arr.reshape(len(arr), -1).astype(np.float32)
    if len(flat) < 2:
        return float("nan")
    total, count = 0.0, 0
    for i in range(len(flat) - 1):  # row by row: exact, and memory stays O(N·D) for large images
        dist = np.sqrt(((flat[i + 1:] - flat[i]) ** 2).sum(axis=1, dtype=np.float64))
        total, count = total + float(dist.sum()), count + len(dist)
    return total / count


def diversity(images: Sequence[Image.Image], groups: Sequence[Any]) -> float:
    """:func:`mean_pairwise_l2` within each group (e.g. the images of one prompt), averaged over the groups
    that hold at least two images; NaN if none does.

    Raises:
        ValueError: ``images`` and ``groups`` differ in length.
    """
    if len(images) != len(groups):
        raise ValueError(f"{len(images)} images but {len(groups)} group labels")
    values = []
    for key in dict.fromkeys(groups):
        members = [im for im, g in zip(images, groups) if g == key]
        if len(members) >= 2:
            values.append(mean_pairwise_l2(members))
    return float(np.mean(values)) if values else float("nan")


