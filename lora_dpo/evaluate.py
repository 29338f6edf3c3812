"""Evaluate a trained run: base vs tuned images from the same held-out seeds, judged by a scorer.

``lora-dpo eval RUN_DIR --scorer SPEC`` (:func:`evaluate_run`), for a run folder of ``lora-dpo train``:

1. For every prompt × seed (seeds ``seed_offset .. seed_offset + seeds_per_prompt - 1``, held out: disjoint
   from the seeds that made the training data), one image from the base model (no adapter) and one from the
   tuned model (``pipe.load_lora_weights(run_dir)``), from the SAME seed. The base set is generated first and
   the adapter is loaded afterwards, so the base images cannot see it.
2. Both sets are scored (``lora_dpo.scorers.load_scorer``; higher = better) and the win rate of tuned over
   base is reported with a 95% interval. Wallace et al. 2023 (arXiv 2311.12908) §5.3 judge Diffusion-DPO
   against its base by such win rates, from humans and from automatic reward models ("AI feedback").
3. When the scorer classifies digits (``predict``) and every prompt names one: the fraction of images
   classified as the prompted digit, base and tuned.
4. Diversity: the mean pairwise L2 distance between the images of one prompt, base and tuned. A tuned/base
   ratio well below 1 flags mode collapse, the usual failure of reward over-optimisation.
5. With held-out preference pairs: the DPO implicit-reward accuracy, how often the tuned policy's implicit
   reward margin (the ``u`` of Eq. 14's ``-log σ(u)``) ranks the preferred image first.
6. Files: ``eval.json``, a side-by-side grid ``eval_grid.png``, the training curves ``training_curves.png``.

The statistics helpers (:func:`win_rate`, :func:`wilson_interval`, :func:`bootstrap_interval`,
:func:`mean_pairwise_l2`) and the picture helpers (:func:`make_grid`, :func:`plot_training_curves`) are pure
and usable alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

REPORT_FILE = "eval.json"
GRID_FILE = "eval_grid.png"
CURVES_FILE = "training_curves.png"
SAMPLES_DIR = "eval_samples"
CURVE_METRICS = ("loss", "rewards/accuracies", "rewards/margins")

# Grid layout, in pixels: a label strip above each prompt's two rows, a column of row names on the left.
LABEL_HEIGHT = 16
SIDE_WIDTH = 44
TILE_TARGET = 96  # small images are enlarged (NEAREST, by an integer factor) to about this size
MAX_TILE = 256  # large images are shrunk to this size

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 2000
CI_METHOD = (
    "win_rate_ci95: Wilson score interval (95%), ties counted as half a win; win_rate_ci95_bootstrap: "
    f"percentile bootstrap over the prompt x seed comparisons ({BOOTSTRAP_RESAMPLES} resamples, seed 0). "
    "Both treat the comparisons as independent."
)
DIVERSITY_METHOD = ("mean pairwise L2 distance between the images of one prompt (flattened, pixels in "
                    "[0, 1]), averaged over prompts")


# ----------------------------------------------------------------------------------------------------------
# Statistics


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


# ----------------------------------------------------------------------------------------------------------
# Pictures


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


# ----------------------------------------------------------------------------------------------------------
# The adapter and the implicit reward


def load_exported_adapter(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The run's exported adapter in PEFT naming, ready for :func:`lora_dpo.adapters.load_lora_state_dict`.

    Reads ``pytorch_lora_weights.safetensors`` (diffusers layout, ``unet.<module>.lora.down.weight``) and
    converts it to ``<module>.lora_A.weight`` (what :func:`lora_dpo.adapters.lora_state_dict` returns). It is
    the file ``pipe.load_lora_weights(run_dir)`` reads for the images, so the implicit reward and the images
    judge one adapter; for a finished run it equals the last checkpoint's ``trainable_weights.safetensors``
    (a test checks this).

    Raises:
        FileNotFoundError: no exported adapter (an interrupted run exports nothing). ValueError: no UNet keys.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    from lora_dpo.export import WEIGHT_NAME

    path = Path(run_dir) / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run exported no adapter (an interrupted run exports "
                                "nothing; resume it with train.resume_from=latest until it finishes)")
    state = load_file(path)
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet:
        raise ValueError(f"{path} holds no UNet LoRA weights (keys such as {sorted(state)[:2]})")
    return convert_unet_state_dict_to_peft(unet)


@dataclass
class _EvalAccelerator:
    """What :func:`lora_dpo.train.dpo_micro_step` uses of an ``Accelerator``: the device and an autocast
    context (autocast only for half-precision weights, as in training)."""

    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _draw_seed(seed: int, batch_index: int, draw: int) -> int:
    return int(np.random.SeedSequence([seed, batch_index, draw]).generate_state(1)[0])


def implicit_reward_accuracy(run_dir: str | Path, cfg, heldout_pairs: str | Path, *, draws: int = 4,
                             seed: int = 0, batch_size: int = 8, max_pairs: int | None = None,
                             device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """DPO implicit-reward accuracy of the run's adapter on held-out preference pairs.

    Per pair, the margin of Wallace et al. Eq. 14, ``u = -0.5·β·[(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]``
    (β from the recipe, ``e`` the per-sample denoising error, θ = base UNet + the adapter, ref = the same UNet
    with the adapter disabled), computed by :func:`lora_dpo.train.dpo_micro_step` for ``draws`` draws of
    (t, noise, VAE sample). Each draw is shared by the policy and the reference and by both images of a pair;
    draw k of batch b is seeded ``SeedSequence([seed, b, k])``, so a result is reproducible for a given
    ``batch_size``. A pair counts as correct when its mean margin over the draws is > 0 (strict).

    Pairs: ``heldout_pairs`` in the Pick-a-Pic schema, loaded by :func:`lora_dpo.data.load_preference_dataset`
    with the recipe's columns and resolution (ties dropped), centre-cropped, no flip, no caption dropout, in
    file order; ``max_pairs`` keeps the first usable ones.

    Args:
        cfg: the run's :class:`lora_dpo.config.RecipeConfig` (``model``, ``lora``, ``data``, ``loss.beta``).
        dtype: frozen weights' dtype (the adapter stays fp32); half precision runs under autocast.
    Returns:
        ``{"accuracy", "margin_mean", "margin_std" (over pairs, of the per-pair mean margin),
        "per_draw_accuracy" (fraction of (pair, draw) with u > 0), "n_pairs", "draws", "seed", "beta",
        "batch_size", "heldout_pairs", "skipped" (rows dropped, by reason), "weights"}``.
    Raises:
        FileNotFoundError: no data at ``heldout_pairs`` or no exported adapter. ValueError: no usable pair.
    """
    from lora_dpo.adapters import add_lora, load_lora_state_dict
    from lora_dpo.data import PreferencePairs, collate_pairs, load_preference_dataset
    from lora_dpo.export import WEIGHT_NAME
    from lora_dpo.models import load_components
    from lora_dpo.train import dpo_micro_step

    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    device = torch.device(device)
    data_cfg = cfg.data.model_copy(update={
        "dataset": str(heldout_pairs), "random_crop": False, "random_flip": False, "caption_dropout": 0.0,
        "max_pairs": max_pairs, "num_workers": 0,
    })
    dataset, report = load_preference_dataset(data_cfg)
    state = load_exported_adapter(run_dir)
    components = load_components(cfg.model, dtype, device)
    add_lora(components.unet, cfg.lora)
    load_lora_state_dict(components.unet, state)
    components.unet.eval()
    accelerator = _EvalAccelerator(device, dtype)
    loader = torch.utils.data.DataLoader(PreferencePairs(dataset, data_cfg, seed), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate_pairs)
    margins, skipped = [], dict(report.get("skipped", {}))
    with torch.no_grad():
        for b, batch in enumerate(loader):
            for reason, n in (batch.skipped or {}).items():
                skipped[reason] = skipped.get(reason, 0) + n
            if batch.num_pairs == 0:
                continue
            per_draw = []
            for k in range(draws):
                generator = torch.Generator(device).manual_seed(_draw_seed(seed, b, k))
                _, metrics = dpo_micro_step(components, components.unet, components.unet, batch, generator,
                                            cfg.loss.beta, accelerator, dtype)
                per_draw.append(metrics["rewards/margins"].double().cpu())
            margins.append(torch.stack(per_draw, dim=1))  # (B, K)
    if not margins:
        raise ValueError(f"no held-out pair of {heldout_pairs} could be decoded: {skipped}")
    u = torch.cat(margins).numpy()  # (P, K)
    mean_u = u.mean(axis=1)
    return {
        "accuracy": float((mean_u > 0).mean()), "margin_mean": float(mean_u.mean()),
        "margin_std": float(mean_u.std()), "per_draw_accuracy": float((u > 0).mean()), "n_pairs": len(u),
        "draws": draws, "seed": seed, "beta": float(cfg.loss.beta), "batch_size": batch_size,
        "heldout_pairs": str(heldout_pairs), "skipped": skipped, "weights": str(Path(run_dir) / WEIGHT_NAME),
    }


# ----------------------------------------------------------------------------------------------------------
# The evaluation


def _digits_of(prompts: Sequence[str]) -> list[int] | None:
    """The digit each prompt names (:func:`lora_dpo.prompts.digit_of`); None if one names no single digit."""
    from lora_dpo.prompts import digit_of

    try:
        return [int(digit_of(p)) for p in prompts]
    except ValueError:
        return None


def _json_safe(value: Any) -> Any:
    """NaN/Inf -> None, numpy scalars -> Python numbers, tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _load_pipeline(model_path: str, family: str, cfg, device: torch.device, dtype: torch.dtype):
    from lora_dpo.export import pipeline_class

    kwargs: dict[str, Any] = dict(revision=cfg.model.revision, variant=cfg.model.variant)
    if dtype != torch.float32:  # diffusers >= 0.42 calls it `dtype`; `torch_dtype` still works back to 0.35
        kwargs["torch_dtype"] = dtype
    if family == "sd15":  # SD1.5's safety checker blacks out images it flags: that would corrupt the scores
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = pipeline_class(family).from_pretrained(model_path, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate_run(run_dir: str | Path, *, base_model: str | None = None, scorer_spec: str | Any,
                 prompts: Sequence[str], seeds_per_prompt: int, seed_offset: int = 10_000,
                 heldout_pairs: str | Path | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 3.0, grid_prompts: int = 10, grid_seeds: int = 6,
                 out_dir: str | Path | None = None, batch_size: int = 64, implicit_draws: int = 4,
                 max_heldout_pairs: int | None = None, device: str | None = None, dtype: str = "float32",
                 save_images: bool = False, progress: bool = False) -> dict[str, Any]:
    """Compare a trained run with its base model; write ``eval.json``, ``eval_grid.png`` and
    ``training_curves.png`` to ``out_dir`` (default ``run_dir``); return the report.

    Args:
        run_dir: a finished ``lora-dpo train`` run (``recipe.yaml``, ``pytorch_lora_weights.safetensors``).
        base_model: pipeline folder or hub id; default the recipe's ``model.pretrained_model_name_or_path``.
        scorer_spec: a :func:`lora_dpo.scorers.load_scorer` spec (``"jpeg"`` or a folder with
            ``classifier.json``), or a scorer object (``name``, ``score(images, prompts) -> (N,)``, optionally
            ``predict(images) -> (N,) int``).
        prompts: P prompts, each sampled with the seeds ``seed_offset .. seed_offset + seeds_per_prompt - 1``
            (pick an offset disjoint from the seeds that generated the training data): N = P ·
            seeds_per_prompt comparisons, each a base and a tuned image from one prompt and one seed.
        heldout_pairs: Pick-a-Pic-schema pairs for :func:`implicit_reward_accuracy` (skipped when None);
            ``max_heldout_pairs`` keeps the first ones, ``implicit_draws`` is K.
        num_inference_steps, guidance_scale: sampler settings, the same for base and tuned. Images are
            ``data.resolution`` pixels square (the training resolution).
        grid_prompts, grid_seeds: prompts (pairs of rows) and seeds (columns) shown in the grid.
        batch_size: images per pipeline call.
        device: default ``cuda`` when available, else ``cpu``.
        dtype: ``float32``, ``float16`` or ``bfloat16``, the pipeline's (and the implicit reward's) weights.
        save_images: also write each image as ``<out_dir>/eval_samples/{base,tuned}/<prompt>_<seed>.png``
            (prompt index, 3 digits).
        progress: show the sampler's progress bars.

    Returns:
        The report written to ``eval.json``: ``n_comparisons``; ``reward_{base,tuned}_{mean,std}``,
        ``reward_delta_mean``; ``win_rate`` (ties count half), ``win_rate_ci95`` (Wilson),
        ``win_rate_ci95_bootstrap``, ``wins``/``ties``/``losses``, ``identical_images``; ``accuracy_base``,
        ``accuracy_tuned``, ``accuracy_delta_points`` (None unless the scorer has ``predict`` and every prompt
        names one digit); ``diversity_base``, ``diversity_tuned``, ``diversity_ratio`` (tuned / base);
        ``implicit_reward_accuracy``, ``implicit_reward_margin_mean`` and ``implicit_reward`` (None without
        held-out pairs); ``per_prompt``; ``settings``; ``files``; ``timing_s``; ``wall_time_s``. NaN is None.
    Raises:
        FileNotFoundError: no ``recipe.yaml`` or exported adapter in ``run_dir``; missing held-out data.
        ValueError: no prompt, ``seeds_per_prompt < 1``, a bad dtype, a scorer output of the wrong shape.
        ModelLoadError / ConfigError: the base model or the recipe cannot be used.
    """
    from lora_dpo.config import load_config
    from lora_dpo.export import WEIGHT_NAME
    from lora_dpo.models import DTYPES, detect_family, read_model_index
    from lora_dpo.sampling import generate_images
    from lora_dpo.scorers import load_scorer

    started = time.perf_counter()
    run_dir, prompts = Path(run_dir), list(prompts)
    if not prompts:
        raise ValueError("no prompt to evaluate")
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt={seeds_per_prompt} must be >= 1")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} must be float32, float16 or bfloat16")
    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a lora-dpo run folder (no recipe.yaml)")
    if not (run_dir / WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{run_dir / WEIGHT_NAME} not found: the run did not finish (resume it)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(run_dir / "recipe.yaml")
    if base_model is not None:
        cfg.model.pretrained_model_name_or_path = str(base_model)
    model_path = cfg.model.pretrained_model_name_or_path
    family = detect_family(read_model_index(model_path, cfg.model.revision))
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype]
    # The scorer loads before any sampling: a bad spec fails fast.
    scorer = load_scorer(scorer_spec) if isinstance(scorer_spec, str) else scorer_spec
    resolution = cfg.data.resolution

    # 1. Images: the base set, then the adapter goes in and the tuned set comes from the same seeds.
    seeds = list(range(seed_offset, seed_offset + seeds_per_prompt))
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = seeds * len(prompts)
    groups = [i for i in range(len(prompts)) for _ in seeds]
    n = len(flat_prompts)
    gen_kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=resolution,
                  width=resolution, batch_size=batch_size, progress=progress)
    timing: dict[str, float] = {}
    log.info("eval: %d prompts x %d seeds = %d comparisons, %d steps, guidance %g, %d px, %s on %s",
             len(prompts), seeds_per_prompt, n, num_inference_steps, guidance_scale, resolution, family,
             torch_device)
    pipe = _load_pipeline(model_path, family, cfg, torch_device, torch_dtype)
    t0 = time.perf_counter()
    base_images = generate_images(pipe, flat_prompts, flat_seeds, **gen_kw)
    timing["generation_base_s"] = time.perf_counter() - t0
    pipe.load_lora_weights(str(run_dir), weight_name=WEIGHT_NAME)
    t0 = time.perf_counter()
    tuned_images = generate_images(pipe, flat_prompts, flat_seeds, **gen_kw)
    timing["generation_tuned_s"] = time.perf_counter() - t0
    del pipe
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()
    if len(base_images) != n or len(tuned_images) != n:
        raise ValueError(f"generate_images returned {len(base_images)} base and {len(tuned_images)} tuned "
                         f"images for {n} prompts")

    # 2. Scores, win rate, accuracy, diversity.
    t0 = time.perf_counter()
    base_scores = np.asarray(scorer.score(base_images, flat_prompts), dtype=np.float64)
    tuned_scores = np.asarray(scorer.score(tuned_images, flat_prompts), dtype=np.float64)
    for name, scores in (("base", base_scores), ("tuned", tuned_scores)):
        if scores.shape != (n,):
            raise ValueError(f"scorer {scorer.name!r} returned shape {scores.shape} for {n} {name} images")
    outcomes = win_outcomes(tuned_scores, base_scores)
    wins, ties = int((outcomes == 1).sum()), int((outcomes == 0.5).sum())
    digits = _digits_of(prompts) if callable(getattr(scorer, "predict", None)) else None
    correct_base = correct_tuned = None
    if digits is not None:
        target = np.repeat(np.asarray(digits), seeds_per_prompt)
        correct_base = np.asarray(scorer.predict(base_images)) == target
        correct_tuned = np.asarray(scorer.predict(tuned_images)) == target
    timing["scoring_s"] = time.perf_counter() - t0
    identical = sum(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base_images, tuned_images))
    if identical == n:
        log.warning("every tuned image equals its base image: the adapter has no visible effect")
    div_base, div_tuned = diversity(base_images, groups), diversity(tuned_images, groups)

    per_prompt = []
    for i, prompt in enumerate(prompts):
        sl = slice(i * seeds_per_prompt, (i + 1) * seeds_per_prompt)
        entry = {
            "prompt": prompt, "win_rate": float(outcomes[sl].mean()),
            "reward_base_mean": float(base_scores[sl].mean()),
            "reward_tuned_mean": float(tuned_scores[sl].mean()),
            "diversity_base": mean_pairwise_l2(base_images[sl]),
            "diversity_tuned": mean_pairwise_l2(tuned_images[sl]),
        }
        if correct_base is not None:
            entry["accuracy_base"] = float(correct_base[sl].mean())
            entry["accuracy_tuned"] = float(correct_tuned[sl].mean())
        per_prompt.append(entry)

    # 3. Pictures.
    shown, cols = min(grid_prompts, len(prompts)), min(grid_seeds, seeds_per_prompt)
    grid_path = curves_path = samples_dir = None
    if shown > 0 and cols > 0:
        starts = [i * seeds_per_prompt for i in range(shown)]
        grid = make_grid(prompts[:shown], [base_images[s:s + cols] for s in starts],
                         [tuned_images[s:s + cols] for s in starts])
        grid_path = out_dir / GRID_FILE
        grid.save(grid_path)
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file() and metrics_path.stat().st_size > 0:
        curves_path = plot_training_curves(metrics_path, out_dir / CURVES_FILE, title=cfg.output.run_name)
    else:
        log.warning("no %s: training curves skipped", metrics_path)
    if save_images:
        samples_dir = out_dir / SAMPLES_DIR
        for kind, images in (("base", base_images), ("tuned", tuned_images)):
            (samples_dir / kind).mkdir(parents=True, exist_ok=True)
            for g, s, im in zip(groups, flat_seeds, images):
                im.save(samples_dir / kind / f"{g:03d}_{s}.png")

    # 4. Implicit reward on held-out pairs.
    implicit = None
    if heldout_pairs is not None:
        t0 = time.perf_counter()
        implicit = implicit_reward_accuracy(run_dir, cfg, heldout_pairs, draws=implicit_draws,
                                            max_pairs=max_heldout_pairs, device=torch_device,
                                            dtype=torch_dtype)
        timing["implicit_reward_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - started

    acc_base = float(correct_base.mean()) if correct_base is not None else None
    acc_tuned = float(correct_tuned.mean()) if correct_tuned is not None else None
    report: dict[str, Any] = {
        "run_dir": str(run_dir), "base_model": model_path, "family": family,
        "adapter": str(run_dir / WEIGHT_NAME),
        "settings": {
            "prompts": prompts, "seeds": seeds, "seed_offset": seed_offset,
            "seeds_per_prompt": seeds_per_prompt,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "resolution": resolution, "scorer": scorer.name,
            "scorer_spec": scorer_spec if isinstance(scorer_spec, str) else type(scorer_spec).__name__,
            "device": str(torch_device), "dtype": dtype, "batch_size": batch_size,
            "heldout_pairs": str(heldout_pairs) if heldout_pairs is not None else None,
            "max_heldout_pairs": max_heldout_pairs, "implicit_draws": implicit_draws,
        },
        "n_comparisons": n,
        "reward_base_mean": float(base_scores.mean()), "reward_base_std": float(base_scores.std()),
        "reward_tuned_mean": float(tuned_scores.mean()), "reward_tuned_std": float(tuned_scores.std()),
        "reward_delta_mean": float((tuned_scores - base_scores).mean()),
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
        "implicit_reward_accuracy": implicit["accuracy"] if implicit else None,
        "implicit_reward_margin_mean": implicit["margin_mean"] if implicit else None,
        "implicit_reward": implicit,
        "per_prompt": per_prompt,
        "files": {
            "eval_json": str(out_dir / REPORT_FILE), "grid": str(grid_path) if grid_path else None,
            "training_curves": str(curves_path) if curves_path else None,
            "samples_dir": str(samples_dir) if samples_dir else None,
        },
        "timing_s": timing, "wall_time_s": timing["total_s"],
    }
    report = _json_safe(report)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines from an :func:`evaluate_run` report (what ``lora-dpo eval`` prints)."""

    def num(value: Any, fmt: str = ".3f") -> str:
        return "n/a" if value is None else format(value, fmt)

    s = report["settings"]
    lo, hi = report["win_rate_ci95"]
    lines = [
        f"eval of {report['run_dir']}: {report['n_comparisons']} comparisons ({len(s['prompts'])} prompts x "
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
    lines.append(f"  diversity  base {num(report['diversity_base'])}, tuned "
                 f"{num(report['diversity_tuned'])}, ratio tuned/base {num(report['diversity_ratio'])}")
    implicit = report.get("implicit_reward")
    if implicit:
        lines.append(f"  implicit-reward accuracy {num(implicit['accuracy'])} on {implicit['n_pairs']} "
                     f"held-out pairs (K={implicit['draws']}), mean margin "
                     f"{num(implicit['margin_mean'], '.4g')}")
    files = report["files"]
    lines.append(f"  report: {files['eval_json']}")
    for key, label in (("grid", "grid:  "), ("training_curves", "curves:")):
        if files.get(key):
            lines.append(f"  {label} {files[key]}")
    return "\n".join(lines)
