"""Evaluate a trained run: base vs tuned images from the same held-out seeds, judged by a scorer.

``lora-dpo eval RUN_DIR --scorer SPEC`` (:func:`evaluate_run`), for a run folder of ``lora-dpo train``:

1. For every prompt × seed (seeds ``seed_offset .. seed_offset + seeds_per_prompt - 1``, held out: disjoint
   from the seeds that made the training data), one image from the base model (no adapter) and one from the
   tuned model (``pipe.load_lora_weights(run_dir)``), from the SAME seed. The base set is generated first and
   the adapter is loaded afterwards, so the base images cannot see it.
2. Both sets are scored (``lora_dpo.feedback.scorers.load_scorer``; higher = better) and the win rate of tuned over
   base is reported with a 95% interval. Wallace et al. 2023 (arXiv 2311.12908) §5.3 judge Diffusion-DPO
   against its base by such win rates, from humans and from automatic reward models ("AI feedback").
3. When the scorer classifies digits (``predict``) and every prompt names one: the fraction of images
   classified as the prompted digit, base and tuned.
4. Diversity: the mean pairwise L2 distance between the images of one prompt, base and tuned. A tuned/base
   ratio well below 1 flags mode collapse, the usual failure of reward over-optimisation.
5. With held-out preference pairs: the DPO implicit-reward accuracy, how often the tuned policy's implicit
   reward margin (the ``u`` of Eq. 14's ``-log σ(u)``) ranks the preferred image first.
6. Files: ``eval.json``, a side-by-side grid ``eval_grid.png``, the training curves ``training_curves.png``.

The statistics live in :mod:`lora_dpo.evaluation.stats`, the pictures in :mod:`lora_dpo.inference.grids`.
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

from lora_dpo.evaluation.stats import (
    CI_METHOD,
    DIVERSITY_METHOD,
    bootstrap_interval,
    diversity,
    mean_pairwise_l2,
    wilson_interval,
    win_outcomes,
)
from lora_dpo.inference.grids import make_grid, plot_training_curves

log = logging.getLogger(__name__)

REPORT_FILE = "eval.json"
GRID_FILE = "eval_grid.png"
CURVES_FILE = "training_curves.png"
SAMPLES_DIR = "eval_samples"


# ----------------------------------------------------------------------------------------------------------
# The adapter and the implicit reward


def load_exported_adapter(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The run's exported adapter in PEFT naming, ready for :func:`lora_dpo.models.adapters.load_lora_state_dict`.

    Reads ``pytorch_lora_weights.safetensors`` (``unet.<module>.lora_A.weight``; older files ``.lora.down.weight``) and
    converts it to ``<module>.lora_A.weight`` (what :func:`lora_dpo.models.adapters.lora_state_dict` returns). It is
    the file ``pipe.load_lora_weights(run_dir)`` reads for the images, so the implicit reward and the images
    judge one adapter; for a finished run it equals the last checkpoint's ``trainable_weights.safetensors``
    (a test checks this).

    Raises:
        FileNotFoundError: no exported adapter (an interrupted run exports nothing). ValueError: no UNet keys.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    from lora_dpo.export.artifacts import WEIGHT_NAME
    from lora_dpo.models.lora_files import read_lora_file

    path = Path(run_dir) / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run exported no adapter (an interrupted run exports "
                                "nothing; resume it with train.resume_from=latest until it finishes)")
    state, _ = read_lora_file(path)
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet:
        raise ValueError(f"{path} holds no UNet LoRA weights (keys such as {sorted(state)[:2]})")
    return convert_unet_state_dict_to_peft(unet)


@dataclass
class _EvalAccelerator:
    """What :func:`lora_dpo.training.recipe.dpo_micro_step` uses of an ``Accelerator``: the device and an autocast
    context (autocast only for half-precision weights, as in training)."""

    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def implicit_reward_accuracy(run_dir: str | Path, cfg, heldout_pairs: str | Path, *, draws: int = 4,
                             seed: int = 0, batch_size: int = 8, max_pairs: int | None = None,
                             device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """DPO implicit-reward accuracy of the run's adapter on held-out preference pairs.

    Per pair, the margin of Wallace et al. Eq. 14, ``u = -0.5·β·[(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]``
    (β from the recipe, ``e`` the per-sample denoising error, θ = base UNet + the adapter, ref = the same UNet
    with the adapter disabled), computed by :func:`lora_dpo.training.recipe.dpo_micro_step` for ``draws`` draws of
    (t, noise, VAE sample). Each draw is shared by the policy and the reference and by both images of a pair;
    draw k of pair i is seeded ``draw_seed(EVAL_SALT, seed, i, k)`` (:mod:`lora_dpo.data.draws`), so a result does not
    depend on ``batch_size``. A pair counts as correct when its mean margin over the draws is > 0 (strict).

    Pairs: ``heldout_pairs`` in the Pick-a-Pic schema, loaded by :func:`lora_dpo.data.sources.load_preference_dataset`
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
    from lora_dpo.config import LossConfig
    from lora_dpo.data.draws import EVAL_SALT, draw_seed
    from lora_dpo.data.pairs import PreferencePairs, collate_pairs
    from lora_dpo.data.sources import load_preference_dataset
    from lora_dpo.export.artifacts import WEIGHT_NAME
    from lora_dpo.models.loading import load_components
    from lora_dpo.models.policy import REFERENCE_LORA_FILE, build_policy
    from lora_dpo.training.recipe import dpo_micro_step

    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    device = torch.device(device)
    data_cfg = cfg.data.model_copy(update={
        "dataset": str(heldout_pairs), "unpaired": False, "random_crop": False, "random_flip": False, "caption_dropout": 0.0,
        "max_pairs": max_pairs, "num_workers": 0,
    })
    dataset, report = load_preference_dataset(data_cfg)
    state = load_exported_adapter(run_dir)
    components = load_components(cfg.model, dtype, device)
    # The run's reference: the base (a fresh adapter disabled) or the LoRA it started from (lora.init_from).
    start = Path(run_dir) / REFERENCE_LORA_FILE
    policy = build_policy(cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": False})}),
                          components.unet, device, components.family, start if start.is_file() else None)
    policy.load_trainable_state_dict(state)
    components.unet.eval()
    reference = policy.reference
    accelerator = _EvalAccelerator(device, dtype)
    implicit = LossConfig(beta=cfg.loss.beta)  # Diffusion-DPO's margin, whatever loss trained the adapter
    loader = torch.utils.data.DataLoader(PreferencePairs(dataset, data_cfg, seed), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate_pairs)
    margins, skipped = [], dict(report.get("skipped", {}))
    with torch.no_grad():
        for batch in loader:
            for reason, n in (batch.skipped or {}).items():
                skipped[reason] = skipped.get(reason, 0) + n
            if batch.num_pairs == 0:
                continue
            per_draw = []
            for k in range(draws):
                batch.draw_seeds = [draw_seed(EVAL_SALT, seed, index, k) for index in batch.indices]
                _, metrics = dpo_micro_step(components, components.unet, reference, batch, implicit, accelerator, dtype)
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
    """The digit each prompt names (:func:`lora_dpo.feedback.prompts.digit_of`); None if one names no single digit."""
    from lora_dpo.feedback.prompts import digit_of

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
        scorer_spec: a :func:`lora_dpo.feedback.scorers.load_scorer` spec (``"jpeg"`` or a folder with
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
    from lora_dpo.export.artifacts import WEIGHT_NAME
    from lora_dpo.feedback.scorers import load_scorer
    from lora_dpo.inference.sampling import generate_images, load_pipeline
    from lora_dpo.models.loading import DTYPES, detect_family, read_model_index
    from lora_dpo.models.lora_files import load_adapter

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
    cfg = load_config(run_dir / "recipe.yaml")
    if cfg.train.mode == "full":
        raise NotImplementedError(
            f"{run_dir} is a full fine-tuning run: lora-dpo eval compares LoRA runs with their base for now. Its "
            "exported pipeline opens with DiffusionPipeline.from_pretrained(run_dir) for your own evaluation"
        )
    if not (run_dir / WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{run_dir / WEIGHT_NAME} not found: the run did not finish (resume it)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
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
    pipe = load_pipeline(model_path, device=torch_device, dtype=torch_dtype, revision=cfg.model.revision,
                         variant=cfg.model.variant)
    t0 = time.perf_counter()
    base_images = generate_images(pipe, flat_prompts, flat_seeds, **gen_kw)
    timing["generation_base_s"] = time.perf_counter() - t0
    load_adapter(pipe, Path(run_dir) / WEIGHT_NAME, "tuned")
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
