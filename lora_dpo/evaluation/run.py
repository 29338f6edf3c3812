"""Evaluate a trained run: base vs tuned images from the same held-out seeds, judged by a scorer.

``lora-dpo eval RUN_DIR --scorer SPEC`` (:func:`evaluate_run`), for a run folder of ``lora-dpo train``:

1. For every prompt × seed (seeds ``seed_offset .. seed_offset + seeds_per_prompt - 1``, held out: disjoint
   from the seeds that made the training data), one image from the base model (no adapter) and one from the
   tuned model (``pipe.load_lora_weights(run_dir)``), from the SAME seed. The base set is generated first and
   the adapter is loaded afterwards, so the base images cannot see it. With a reference adapter (e.g. the
   previous round of iterative DPO) the "base" side is the base model plus that adapter, removed from the
   pipeline (``unload_lora_weights``) before the run's adapter goes in.
2. Both sets are scored (``lora_dpo.feedback.scorers.load_scorer``; higher = better) and the win rate of tuned over
   base is reported with a 95% interval. Wallace et al. 2023 (arXiv 2311.12908) §5.3 judge Diffusion-DPO
   against its base by such win rates, from humans and from automatic reward models ("AI feedback").
3. When the scorer classifies digits (``predict``) and every prompt names one: the fraction of images
   classified as the prompted digit, base and tuned, and the comparisons the tuning fixed (tuned read as the
   prompted digit, base not) and broke (the reverse).
4. Diversity: the mean pairwise L2 distance between the images of one prompt, base and tuned. A tuned/base
   ratio well below 1 flags mode collapse, the usual failure of reward over-optimisation.
5. With held-out preference pairs: the DPO implicit-reward accuracy, how often the tuned policy's implicit
   reward margin (the ``u`` of Eq. 14's ``-log σ(u)``) ranks the preferred image first
   (:mod:`lora_dpo.evaluation.implicit_reward`).
6. Files: ``eval.json``, a side-by-side grid ``eval_grid.png`` (fixed comparisons framed green, broken ones red),
   ``eval_changes.png`` (the fixed and the broken comparisons, when there are any), the training curves
   ``training_curves.png``.

The statistics live in :mod:`lora_dpo.evaluation.stats` and :mod:`lora_dpo.evaluation.report`, the pictures in
:mod:`lora_dpo.inference.grids` and :mod:`lora_dpo.evaluation.figures`.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from tqdm.auto import tqdm

from lora_dpo.config import RecipeConfig, load_config
from lora_dpo.evaluation.figures import plot_training_curves
from lora_dpo.evaluation.implicit_reward import implicit_reward_accuracy
from lora_dpo.evaluation.report import (
    Scores,
    change_marks,
    comparison_stats,
    digit_changes,
    json_safe,
    per_prompt_stats,
)
from lora_dpo.evaluation.stats import win_outcomes
from lora_dpo.feedback.prompts import digit_of
from lora_dpo.feedback.scorers import load_scorer
from lora_dpo.inference.grids import make_grid
from lora_dpo.inference.sampling import (
    fused_adapters,
    generate_images,
    load_pipeline,
    quiet_loading,
    sampling_guidance,
)
from lora_dpo.models.loading import DTYPES, detect_family, read_model_index
from lora_dpo.models.lora_files import WEIGHT_NAME, check_adapter_fits_model, load_adapter

log = logging.getLogger(__name__)

# Draws of (t, noise) per held-out pair for the implicit-reward accuracy: enough that its standard error from the
# draws is under 0.01 on the digits world (benchmarks/results/implicit_draws_cpu.json: 0.0092 at 256, 0.012 at 128).
IMPLICIT_DRAWS = 256
REPORT_FILE = "eval.json"
GRID_FILE = "eval_grid.png"
CURVES_FILE = "training_curves.png"
SAMPLES_DIR = "eval_samples"
CHANGES_FILE = "eval_changes.png"
CHANGES_CAP = 24  # comparisons shown per block (fixed, broken) of the changes grid
CHANGES_COLUMNS = 6  # comparisons per row of the changes grid; also its least width, room for the labels


@dataclass
class _Comparisons:
    """The P prompts × S seeds of an evaluation, flattened prompt-major: comparison i is prompt ``i // S`` with
    seed ``seeds[i % S]``, one base and one tuned image each."""

    prompts: list[str]
    seeds: list[int]

    @property
    def flat_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in self.seeds]

    @property
    def flat_seeds(self) -> list[int]:
        return self.seeds * len(self.prompts)

    @property
    def groups(self) -> list[int]:
        """The prompt index of each comparison."""
        return [i for i in range(len(self.prompts)) for _ in self.seeds]


def _digits_of(prompts: Sequence[str]) -> list[int] | None:
    """The digit each prompt names (:func:`lora_dpo.feedback.prompts.digit_of`); None if one names no single digit."""
    try:
        return [int(digit_of(p)) for p in prompts]
    except ValueError:
        return None


def _load_run(run_dir: Path, prompts: list[str], seeds_per_prompt: int, dtype: str) -> RecipeConfig:
    """Check the arguments and the run folder (in this order); return the run's recipe."""
    if not prompts:
        raise ValueError("no prompt to evaluate")
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt={seeds_per_prompt} must be >= 1")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} must be float32, float16 or bfloat16")
    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a lora-dpo run folder (no recipe.yaml)")
    cfg = load_config(run_dir / "recipe.yaml")
    if cfg.train.mode == "full":
        raise NotImplementedError(
            f"{run_dir} is a full fine-tuning run: lora-dpo eval compares LoRA runs with their base for now. Its "
            "exported pipeline opens with DiffusionPipeline.from_pretrained(run_dir) for your own evaluation"
        )
    if not (run_dir / WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{run_dir / WEIGHT_NAME} not found: the run did not finish (resume it)")
    return cfg


def _sample(pipe, plan: _Comparisons, sampler: dict[str, Any], bar: tqdm, what: str) -> list[Image.Image]:
    """One image per comparison with the pipeline's active adapters fused into its weights
    (:func:`lora_dpo.inference.sampling.fused_adapters`; none: the plain model)."""
    bar.set_description(f"eval: {what} images")
    with fused_adapters(pipe):
        return generate_images(pipe, plan.flat_prompts, plan.flat_seeds, **sampler, on_batch=bar.update)


def _remove_adapters(pipe) -> None:
    """Take every LoRA layer out of the pipeline (``unload_lora_weights``: each adapted module is its plain base
    module again). Raises RuntimeError if one is left."""
    pipe.unload_lora_weights()
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    if any(isinstance(layer, BaseTunerLayer) for model in models for layer in model.modules()):
        raise RuntimeError("the reference adapter could not be removed from the pipeline")


def _generate_base_and_tuned(cfg: RecipeConfig, run_dir: Path, plan: _Comparisons, sampler: dict[str, Any],
                             device: torch.device, dtype: torch.dtype, timing: dict[str, float],
                             bar: tqdm, reference: str | None = None) -> tuple[list[Image.Image], list[Image.Image]]:
    """The base set (with ``reference``: the base model plus that adapter, fused while it samples, then removed),
    then the adapter goes in and the tuned set comes from the same seeds, the adapter fused into the weights while
    it samples (:func:`lora_dpo.inference.sampling.fused_adapters`); ``sampler``:
    :func:`lora_dpo.inference.sampling.generate_images`'s settings. Adds the generation times to ``timing`` and
    advances ``bar`` by one per image."""
    pipe = load_pipeline(cfg.model.pretrained_model_name_or_path, device=device, dtype=dtype,
                         revision=cfg.model.revision, variant=cfg.model.variant)
    t0 = time.perf_counter()
    if reference is not None:
        load_adapter(pipe, reference, "reference")
    base_images = _sample(pipe, plan, sampler, bar, "base" if reference is None else "reference")
    if reference is not None:
        _remove_adapters(pipe)
    timing["generation_base_s"] = time.perf_counter() - t0
    load_adapter(pipe, Path(run_dir) / WEIGHT_NAME, "tuned")
    t0 = time.perf_counter()
    tuned_images = _sample(pipe, plan, sampler, bar, "tuned")
    timing["generation_tuned_s"] = time.perf_counter() - t0
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n = len(plan.flat_prompts)
    if len(base_images) != n or len(tuned_images) != n:
        raise ValueError(f"generate_images returned {len(base_images)} base and {len(tuned_images)} tuned "
                         f"images for {n} prompts")
    return base_images, tuned_images


def _score(scorer: Any, plan: _Comparisons, base_images: list[Image.Image],
           tuned_images: list[Image.Image]) -> Scores:
    """Score both sets (base first) and, when the scorer classifies digits and every prompt names one, check each
    image's digit. Raises ValueError for a scorer output of the wrong shape."""
    flat_prompts, n = plan.flat_prompts, len(plan.flat_prompts)
    base_scores = np.asarray(scorer.score(base_images, flat_prompts), dtype=np.float64)
    tuned_scores = np.asarray(scorer.score(tuned_images, flat_prompts), dtype=np.float64)
    for name, scores in (("base", base_scores), ("tuned", tuned_scores)):
        if scores.shape != (n,):
            raise ValueError(f"scorer {scorer.name!r} returned shape {scores.shape} for {n} {name} images")
    scored = Scores(base_scores, tuned_scores, win_outcomes(tuned_scores, base_scores))
    digits = _digits_of(plan.prompts) if callable(getattr(scorer, "predict", None)) else None
    if digits is not None:
        target = np.repeat(np.asarray(digits), len(plan.seeds))
        scored.correct_base = np.asarray(scorer.predict(base_images)) == target
        scored.correct_tuned = np.asarray(scorer.predict(tuned_images)) == target
    return scored


def _changes_grid(plan: _Comparisons, base_images: list[Image.Image], tuned_images: list[Image.Image],
                  marks: list[str | None]) -> Image.Image | None:
    """The fixed comparisons, then the broken ones (the first :data:`CHANGES_CAP` of each), base above tuned, in
    :func:`lora_dpo.inference.grids.make_grid` rows of up to :data:`CHANGES_COLUMNS` comparisons of one prompt,
    each framed in its mark's colour. A row's label names its block with the block's count (and how many are shown
    when capped), the prompt and the seeds from left to right: ``fixed (37): a handwritten digit seven; seeds
    10003, 10007``. None when nothing changed."""
    labels, base_rows, tuned_rows, row_marks = [], [], [], []
    for kind in ("fixed", "broken"):
        changed = [i for i, mark in enumerate(marks) if mark == kind]
        shown = changed[:CHANGES_CAP]
        head = f"{kind} ({len(changed)}" + (f", first {len(shown)} shown)" if len(shown) < len(changed) else ")")
        for group, members in itertools.groupby(shown, key=lambda i: plan.groups[i]):
            members = list(members)
            for c in range(0, len(members), CHANGES_COLUMNS):
                chunk = members[c:c + CHANGES_COLUMNS]
                seeds = ", ".join(str(plan.flat_seeds[i]) for i in chunk)
                labels.append(f"{head}: {plan.prompts[group]}; seed{'s' if len(chunk) > 1 else ''} {seeds}")
                base_rows.append([base_images[i] for i in chunk])
                tuned_rows.append([tuned_images[i] for i in chunk])
                row_marks.append([kind] * len(chunk))
    if not labels:
        return None
    return make_grid(labels, base_rows, tuned_rows, marks=row_marks, min_cols=CHANGES_COLUMNS)


def _save_grids(plan: _Comparisons, base_images: list[Image.Image], tuned_images: list[Image.Image],
                marks: list[str | None] | None, out_dir: Path, *, grid_prompts: int,
                grid_seeds: int) -> dict[str, Path | None]:
    """Write the grid (the first ``grid_prompts`` prompts × ``grid_seeds`` seeds, fixed / broken comparisons
    framed when ``marks`` is given) and, when ``marks`` holds a change, the changes grid. Returns their paths
    (``grid``, ``changes_grid``; None when not written)."""
    seeds_per_prompt = len(plan.seeds)
    shown, cols = min(grid_prompts, len(plan.prompts)), min(grid_seeds, seeds_per_prompt)
    paths: dict[str, Path | None] = {"grid": None, "changes_grid": None}
    if shown > 0 and cols > 0:
        starts = [i * seeds_per_prompt for i in range(shown)]
        grid = make_grid(plan.prompts[:shown], [base_images[s:s + cols] for s in starts],
                         [tuned_images[s:s + cols] for s in starts],
                         marks=[marks[s:s + cols] for s in starts] if marks is not None else None)
        paths["grid"] = out_dir / GRID_FILE
        grid.save(paths["grid"])
    changes = _changes_grid(plan, base_images, tuned_images, marks) if marks is not None else None
    if changes is not None:
        paths["changes_grid"] = out_dir / CHANGES_FILE
        changes.save(paths["changes_grid"])
    return paths


def _save_pictures(plan: _Comparisons, base_images: list[Image.Image], tuned_images: list[Image.Image],
                   cfg: RecipeConfig, run_dir: Path, out_dir: Path, *, grid_prompts: int, grid_seeds: int,
                   save_images: bool, marks: list[str | None] | None = None) -> dict[str, Path | None]:
    """Write the grids (:func:`_save_grids`), the training curves (when the run logged metrics) and, with
    ``save_images``, every image. Returns the paths written: grid, changes_grid, curves, samples_dir."""
    paths = {**_save_grids(plan, base_images, tuned_images, marks, out_dir, grid_prompts=grid_prompts,
                           grid_seeds=grid_seeds), "curves": None, "samples_dir": None}
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file() and metrics_path.stat().st_size > 0:
        paths["curves"] = plot_training_curves(metrics_path, out_dir / CURVES_FILE, title=cfg.output.run_name)
    else:
        log.warning("no %s: training curves skipped", metrics_path)
    if save_images:
        paths["samples_dir"] = samples_dir = out_dir / SAMPLES_DIR
        for kind, images in (("base", base_images), ("tuned", tuned_images)):
            (samples_dir / kind).mkdir(parents=True, exist_ok=True)
            for g, s, im in zip(plan.groups, plan.flat_seeds, images):
                im.save(samples_dir / kind / f"{g:03d}_{s}.png")
    return paths


def _prepare(run_dir: Path, prompts: list[str], scorer_spec: str | Any, base_model: str | None,
             device: str | None, seeds_per_prompt: int, dtype: str,
             reference_adapter: str | Path | None) -> tuple[RecipeConfig, str, torch.device, Any]:
    """:func:`evaluate_run`'s checks, before any weights load: the arguments and the run folder, the base model's
    family, the reference adapter against the base model (a bad path or a mismatched adapter fails fast), the
    scorer (a bad spec fails fast). Returns the recipe (``base_model`` applied), the family, the device and the
    scorer."""
    cfg = _load_run(run_dir, prompts, seeds_per_prompt, dtype)
    if base_model is not None:
        cfg.model.pretrained_model_name_or_path = str(base_model)
    family = detect_family(read_model_index(cfg.model.pretrained_model_name_or_path, cfg.model.revision))
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if reference_adapter is not None:
        check_adapter_fits_model(reference_adapter, cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    scorer = load_scorer(scorer_spec) if isinstance(scorer_spec, str) else scorer_spec
    return cfg, family, torch_device, scorer


def _settings(cfg: RecipeConfig, family: str, scorer: Any, scorer_spec: str | Any, prompts: list[str], *,
              seed_offset: int, seeds_per_prompt: int, num_inference_steps: int, guidance_scale: float | None,
              device: torch.device, dtype: str, batch_size: int, heldout_pairs: str | Path | None,
              max_heldout_pairs: int | None, implicit_draws: int,
              reference_adapter: str | Path | None) -> dict[str, Any]:
    """The report's ``settings``: :func:`evaluate_run`'s arguments as used (the guidance scale resolved: the
    argument, else the recipe's, else 3.0; paths as strings). Logs what the evaluation will do."""
    guidance_scale = sampling_guidance(guidance_scale, cfg.model.guidance_scale)
    log.info("eval: %d prompts x %d seeds = %d comparisons, %d steps, guidance %g, %d px, %s on %s%s",
             len(prompts), seeds_per_prompt, len(prompts) * seeds_per_prompt, num_inference_steps, guidance_scale,
             cfg.data.resolution, family, device, f", against {reference_adapter}" if reference_adapter else "")
    return {
        "prompts": prompts, "seeds": list(range(seed_offset, seed_offset + seeds_per_prompt)),
        "seed_offset": seed_offset, "seeds_per_prompt": seeds_per_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "resolution": cfg.data.resolution, "scorer": scorer.name,
        "scorer_spec": scorer_spec if isinstance(scorer_spec, str) else type(scorer_spec).__name__,
        "device": str(device), "dtype": dtype, "batch_size": batch_size,
        "heldout_pairs": str(heldout_pairs) if heldout_pairs is not None else None,
        "max_heldout_pairs": max_heldout_pairs, "implicit_draws": implicit_draws,
        "reference_adapter": str(reference_adapter) if reference_adapter is not None else None,
    }


def evaluate_run(run_dir: str | Path, *, base_model: str | None = None, scorer_spec: str | Any,
                 prompts: Sequence[str], seeds_per_prompt: int, seed_offset: int = 10_000,
                 heldout_pairs: str | Path | None = None, num_inference_steps: int = 20,
                 guidance_scale: float | None = None, grid_prompts: int = 10, grid_seeds: int = 6,
                 out_dir: str | Path | None = None, batch_size: int = 64, implicit_draws: int = IMPLICIT_DRAWS,
                 max_heldout_pairs: int | None = None, device: str | None = None, dtype: str = "float32",
                 save_images: bool = False, progress: bool = False,
                 reference_adapter: str | Path | None = None) -> dict[str, Any]:
    """Compare a trained run with its base model (or with the base model plus ``reference_adapter``); write
    ``eval.json``, ``eval_grid.png``, ``eval_changes.png`` (digit scorers, when a comparison changed) and
    ``training_curves.png`` to ``out_dir`` (default ``run_dir``); return the report.

    Args:
        run_dir: a finished ``lora-dpo train`` run (``recipe.yaml``, ``pytorch_lora_weights.safetensors``).
        base_model: pipeline folder or hub id; default the recipe's ``model.pretrained_model_name_or_path``.
        scorer_spec: a :func:`lora_dpo.feedback.scorers.load_scorer` spec (``"jpeg"`` or a folder with
            ``classifier.json``), or a scorer object (``name``, ``score(images, prompts) -> (N,)``, optionally
            ``predict(images) -> (N,) int``).
        prompts: P prompts, each sampled with the seeds ``seed_offset .. seed_offset + seeds_per_prompt - 1``
            (pick an offset disjoint from the seeds that generated the training data): N = P ·
            seeds_per_prompt comparisons, each a base and a tuned image from one prompt and one seed.
        heldout_pairs: Pick-a-Pic-schema pairs for :func:`lora_dpo.evaluation.implicit_reward.implicit_reward_accuracy`
            (skipped when None); ``max_heldout_pairs`` keeps the first ones, ``implicit_draws`` is K (default
            :data:`IMPLICIT_DRAWS`; the error from the draws by K: ``benchmarks/implicit_draws.py``).
        num_inference_steps, guidance_scale: sampler settings, the same for base and tuned (None: the recipe's
            ``model.guidance_scale``, FLUX.1-dev's trained guidance, else 3.0). Images are ``data.resolution`` pixels
            square (passed explicitly: FLUX's pipeline defaults to 1024 px), sampled by the family's pipeline.
        grid_prompts, grid_seeds: prompts (pairs of rows) and seeds (columns) shown in the grid.
        batch_size: images per pipeline call.
        device: default ``cuda`` when available, else ``cpu``.
        dtype: ``float32``, ``float16`` or ``bfloat16``, the pipeline's (and the implicit reward's) weights.
        save_images: also write each image as ``<out_dir>/eval_samples/{base,tuned}/<prompt>_<seed>.png``
            (prompt index, 3 digits).
        progress: one progress bar (stderr, with an ETA) over the evaluation: the base images, the tuned images
            and the held-out pairs of the implicit reward. The pipeline's own per-call bars are always off.
        reference_adapter: a LoRA (run folder or ``.safetensors`` file, e.g. the previous round of iterative DPO)
            on the base model for the "base" side of every comparison, which then compares the run's adapter with
            that adapter; removed from the pipeline before the run's adapter is loaded. Checked against the base
            model before anything samples. The implicit reward still measures against the base model.

    Returns:
        The report written to ``eval.json``: ``n_comparisons``; ``reward_{base,tuned}_{mean,std}``,
        ``reward_delta_mean``; ``win_rate`` (ties count half), ``win_rate_ci95`` (Wilson),
        ``win_rate_ci95_bootstrap``, ``wins``/``ties``/``losses``, ``identical_images``; ``accuracy_base``,
        ``accuracy_tuned``, ``accuracy_delta_points``, ``fixed`` and ``broken`` (the numbers of comparisons whose
        tuned image is read as the prompted digit and whose base image is not, and the reverse),
        ``fixed_comparisons`` and ``broken_comparisons`` (lists of ``{"prompt", "seed"}``) (all None unless the
        scorer has ``predict`` and every prompt names one digit); ``diversity_base``, ``diversity_tuned``, ``diversity_ratio`` (tuned / base);
        ``implicit_reward_accuracy``, ``implicit_reward_margin_mean`` and ``implicit_reward`` (None without
        held-out pairs); ``per_prompt``; ``settings`` (with ``reference_adapter``, a str or None); ``files``
        (``eval_json``, ``grid``, ``changes_grid``, ``training_curves``, ``samples_dir``: paths or None);
        ``timing_s``; ``wall_time_s``. NaN is None.
    Raises:
        FileNotFoundError: no ``recipe.yaml`` or exported adapter in ``run_dir``; missing held-out data; no
            ``reference_adapter`` at the path given (before anything samples).
        ValueError: no prompt, ``seeds_per_prompt < 1``, a bad dtype, a scorer output of the wrong shape, a
            folder ``reference_adapter`` holding several ``.safetensors`` files.
        UnsafeFileError, CorruptFileError, AdapterMismatchError: a ``reference_adapter`` that is not a safetensors
            LoRA for the base model.
        ModelLoadError / ConfigError: the base model or the recipe cannot be used.
    """
    started = time.perf_counter()
    run_dir, prompts = Path(run_dir), list(prompts)
    cfg, family, torch_device, scorer = _prepare(run_dir, prompts, scorer_spec, base_model, device, seeds_per_prompt,
                                                 dtype, reference_adapter)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, family, scorer, scorer_spec, prompts, seed_offset=seed_offset,
                         seeds_per_prompt=seeds_per_prompt, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, device=torch_device, dtype=dtype, batch_size=batch_size,
                         heldout_pairs=heldout_pairs, max_heldout_pairs=max_heldout_pairs,
                         implicit_draws=implicit_draws, reference_adapter=reference_adapter)
    results = _compare(cfg, run_dir, out_dir, scorer, settings, torch_device, DTYPES[dtype], grid_prompts=grid_prompts,
                       grid_seeds=grid_seeds, save_images=save_images, progress=progress)
    results["timing_s"]["total_s"] = time.perf_counter() - started
    report = json_safe({"run_dir": str(run_dir), "base_model": cfg.model.pretrained_model_name_or_path,
                        "family": family, "adapter": str(run_dir / WEIGHT_NAME), "settings": settings, **results,
                        "wall_time_s": results["timing_s"]["total_s"]})
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _compare(cfg: RecipeConfig, run_dir: Path, out_dir: Path, scorer: Any, settings: dict[str, Any],
             device: torch.device, dtype: torch.dtype, *, grid_prompts: int, grid_seeds: int, save_images: bool,
             progress: bool) -> dict[str, Any]:
    """:func:`evaluate_run`'s steps after the checks: images, scores, statistics, pictures and (with held-out pairs)
    the implicit reward, by the report's ``settings``. Returns the report's fields from ``n_comparisons`` to
    ``timing_s`` (whose ``total_s`` the caller adds)."""
    plan = _Comparisons(settings["prompts"], settings["seeds"])
    sampler = dict(num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                   height=settings["resolution"], width=settings["resolution"], batch_size=settings["batch_size"],
                   progress=False)
    timing: dict[str, float] = {}
    # One bar over the whole evaluation: base and tuned images, then (their total known once they load) the
    # held-out pairs. Its ETA counts items of unequal cost: an image is num_inference_steps sampler steps, a pair
    # implicit_draws single-step passes.
    with tqdm(total=2 * len(plan.flat_prompts), desc="eval", unit="item", disable=not progress,
              dynamic_ncols=True) as bar, quiet_loading():
        base_images, tuned_images = _generate_base_and_tuned(cfg, run_dir, plan, sampler, device, dtype, timing, bar,
                                                             settings["reference_adapter"])
        t0 = time.perf_counter()
        scores = _score(scorer, plan, base_images, tuned_images)
        timing["scoring_s"] = time.perf_counter() - t0
        stats = comparison_stats(scores, base_images, tuned_images, plan.groups)
        changes = digit_changes(scores, plan.flat_prompts, plan.flat_seeds)
        per_prompt = per_prompt_stats(plan.prompts, len(plan.seeds), scores, base_images, tuned_images)
        paths = _save_pictures(plan, base_images, tuned_images, cfg, run_dir, out_dir, grid_prompts=grid_prompts,
                               grid_seeds=grid_seeds, save_images=save_images, marks=change_marks(scores))
        implicit = None
        if settings["heldout_pairs"] is not None:
            t0 = time.perf_counter()
            bar.set_description("eval: implicit reward")
            implicit = implicit_reward_accuracy(run_dir, cfg, settings["heldout_pairs"],
                                                draws=settings["implicit_draws"],
                                                max_pairs=settings["max_heldout_pairs"], device=device, dtype=dtype,
                                                progress=bar)
            timing["implicit_reward_s"] = time.perf_counter() - t0
    files = {"eval_json": out_dir / REPORT_FILE, "grid": paths["grid"], "changes_grid": paths["changes_grid"],
             "training_curves": paths["curves"], "samples_dir": paths["samples_dir"]}
    return {
        **stats, **changes,
        "implicit_reward_accuracy": implicit["accuracy"] if implicit else None,
        "implicit_reward_margin_mean": implicit["margin_mean"] if implicit else None,
        "implicit_reward": implicit, "per_prompt": per_prompt,
        "files": {key: str(path) if path else None for key, path in files.items()},
        "timing_s": timing,
    }
