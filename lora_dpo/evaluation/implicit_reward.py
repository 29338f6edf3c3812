"""The DPO implicit-reward accuracy of a run's adapter on held-out preference pairs.

Diffusion-DPO's implicit reward (Wallace et al. 2023, arXiv 2311.12908, Eq. 14) ranks a pair by the margin
``u`` of its loss ``-log σ(u)``: how much more the policy than the reference lowers the denoising error of the
preferred image. :func:`implicit_reward_accuracy` measures how often ``u > 0`` on pairs the run did not train on,
with the run's exported adapter (:func:`load_exported_adapter`: the file the images of ``lora-dpo eval`` use).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import convert_unet_state_dict_to_peft

from lora_dpo.config import DataConfig, LossConfig, RecipeConfig
from lora_dpo.data.draws import EVAL_SALT, draw_seed
from lora_dpo.data.pairs import PairDataset, collate_pairs
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.models.families import family_for_index
from lora_dpo.models.loading import Components, load_components, read_model_index
from lora_dpo.models.lora_files import WEIGHT_NAME, read_lora_file
from lora_dpo.models.policy import REFERENCE_LORA_FILE, build_policy
from lora_dpo.training.steps import Reference, dpo_micro_step


def load_exported_adapter(run_dir: str | Path, denoiser_name: str = "unet") -> dict[str, torch.Tensor]:
    """The run's exported adapter in PEFT naming, ready for :func:`lora_dpo.models.adapters.load_lora_state_dict`.

    Reads ``pytorch_lora_weights.safetensors`` (``<denoiser>.<module>.lora_A.weight``; older UNet files
    ``.lora.down.weight``) and converts it to ``<module>.lora_A.weight`` (what
    :func:`lora_dpo.models.adapters.lora_state_dict` returns). ``denoiser_name``: the family's
    :attr:`~lora_dpo.models.families.base.ModelFamily.denoiser_name`, the prefix of its keys (``unet``; SD3 / FLUX
    ``transformer``). It is the file ``pipe.load_lora_weights(run_dir)`` reads for the images, so the implicit reward
    and the images judge one adapter; for a finished run it equals the last checkpoint's
    ``trainable_weights.safetensors`` (a test checks this).

    Raises:
        FileNotFoundError: no exported adapter (an interrupted run exports nothing). ValueError: no keys of the
            denoiser (e.g. an SD1.5 file read for a FLUX run).
    """
    path = Path(run_dir) / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run exported no adapter (an interrupted run exports "
                                "nothing; resume it with train.resume_from=latest until it finishes)")
    state, _ = read_lora_file(path)
    prefix = f"{denoiser_name}."
    denoiser = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not denoiser:
        raise ValueError(f"{path} holds no LoRA weights of the {denoiser_name} (keys {prefix}...; found keys such "
                         f"as {sorted(state)[:2]})")
    return convert_unet_state_dict_to_peft(denoiser)  # the layouts' names -> PEFT's; PEFT names pass unchanged


@dataclass
class _EvalAccelerator:
    """What :func:`lora_dpo.training.steps.dpo_micro_step` uses of an ``Accelerator``: the device and an autocast
    context (autocast only for half-precision weights, as in training)."""

    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _heldout_data_config(cfg: RecipeConfig, heldout_pairs: str | Path, max_pairs: int | None) -> DataConfig:
    """The recipe's data section pointed at the held-out pairs: centre crop, no flip, no caption dropout, pairs only
    (no unpaired labels), the first ``max_pairs`` usable pairs, read in this process."""
    return cfg.data.model_copy(update={
        "dataset": str(heldout_pairs), "unpaired": False, "random_crop": False, "random_flip": False, "caption_dropout": 0.0,
        "max_pairs": max_pairs, "num_workers": 0,
    })


def _load_policy(run_dir: str | Path, cfg: RecipeConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, reference: str = "run") -> tuple[Components, Reference]:
    """The frozen components (``dtype``) with the run's adapter ``state`` loaded into the policy (fp32), in eval
    mode, and the reference: ``run``, the run's own (the base, a fresh adapter disabled, or the LoRA it started from,
    ``lora.init_from``, kept in the run folder as ``REFERENCE_LORA_FILE``); ``base``, the base always (the adapter
    disabled: the adapter then has the recipe's ``lora`` rank and modules, as every round of ``lora-dpo iterate``)."""
    components = load_components(cfg.model, dtype, device)
    start = Path(run_dir) / REFERENCE_LORA_FILE
    start = start if reference == "run" and start.is_file() else None
    policy = build_policy(cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": False})}),
                          components.unet, device, components.family, start)
    try:
        policy.load_trainable_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        if start is not None:
            raise
        raise ValueError(f"the adapter of {run_dir} does not fit a fresh adapter of the recipe's lora section (r, "
                         f"target_modules), which the base as reference needs: {exc}") from exc
    components.unet.eval()
    return components, policy.reference


@torch.no_grad()
def _pair_margins(components: Components, reference: Reference, loader: torch.utils.data.DataLoader, beta: float,
                  draws: int, seed: int, accelerator: _EvalAccelerator, skipped: dict[str, int],
                  progress: Any = None, timesteps: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Eq. 14's margin ``u`` of every pair the loader yields, for ``draws`` keyed draws each: a list of ``(B, K)``
    float64 tensors, one per batch with pairs. Rows the loader skips are counted into ``skipped`` (by reason);
    ``progress`` (a tqdm bar, or None) advances by one per row read; ``timesteps`` (a list, or None) receives the
    draws' timesteps, one ``(B, K)`` float64 tensor per batch, aligned with the margins."""
    implicit = LossConfig(beta=beta)  # Diffusion-DPO's margin, whatever loss trained the adapter
    margins = []
    for batch in loader:
        for reason, n in (batch.skipped or {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
        if batch.num_pairs == 0:
            if progress is not None:
                progress.update(batch.num_skipped)
            continue
        per_draw, per_draw_t = [], []
        for k in range(draws):
            batch.draw_seeds = [draw_seed(EVAL_SALT, seed, index, k) for index in batch.indices]
            _, metrics = dpo_micro_step(components, components.unet, reference, batch, implicit, accelerator,
                                        accelerator.dtype)
            per_draw.append(metrics["rewards/margins"].double().cpu())
            per_draw_t.append(metrics["timestep"].double().cpu())
        margins.append(torch.stack(per_draw, dim=1))  # (B, K)
        if timesteps is not None:
            timesteps.append(torch.stack(per_draw_t, dim=1))
        if progress is not None:
            progress.update(batch.num_pairs + batch.num_skipped)
    return margins


def implicit_reward_accuracy(run_dir: str | Path, cfg: RecipeConfig, heldout_pairs: str | Path, *, draws: int = 4,
                             seed: int = 0, batch_size: int = 8, max_pairs: int | None = None,
                             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                             progress: Any = None, reference: str = "run",
                             return_draws: bool = False) -> dict[str, Any]:
    """DPO implicit-reward accuracy of the run's adapter on held-out preference pairs.

    Per pair, the margin of Wallace et al. Eq. 14, ``u = -0.5·β·[(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]``
    (β from the recipe, ``e`` the per-sample denoising error, θ = base denoiser + the adapter, ref = the same
    denoiser with the adapter disabled), computed by :func:`lora_dpo.training.steps.dpo_micro_step` for ``draws``
    draws of (t, noise, VAE sample), noised and targeted as the family trains (:func:`lora_dpo.models.loading.add_noise`,
    :func:`~lora_dpo.models.loading.timestep_sampler`: SD1.5/SDXL ε or v at an integer t; SD3 / FLUX the velocity at
    σ from the recipe's density, FLUX conditioned on the recipe's guidance scale). Each draw is shared by the policy and the reference and by both images of a pair;
    draw k of pair i is seeded ``draw_seed(EVAL_SALT, seed, i, k)`` (:mod:`lora_dpo.data.draws`), so a result does not
    depend on ``batch_size``. A pair counts as correct when its mean margin over the draws is > 0 (strict).

    Pairs: ``heldout_pairs`` in the Pick-a-Pic schema, loaded by :func:`lora_dpo.data.sources.load_preference_dataset`
    with the recipe's columns and resolution (ties dropped), centre-cropped, no flip, no caption dropout, in
    file order; ``max_pairs`` keeps the first usable ones.

    Args:
        cfg: the run's :class:`lora_dpo.config.RecipeConfig` (``model``, ``lora``, ``data``, ``loss.beta``).
        dtype: frozen weights' dtype (the adapter stays fp32); half precision runs under autocast.
        progress: a tqdm bar to advance (or None): its total grows by the rows to read, and it moves by one per
            row read (a pair, or a row skipped).
        reference: ``run`` (the run's own reference: the base, or the LoRA it started from) or ``base`` (the base
            model, whatever the run started from: the cumulative implicit reward of an iterated adapter).
        return_draws: also return every draw's margin and timestep (``benchmarks/implicit_draws.py`` uses them).
    Returns:
        ``{"accuracy", "accuracy_se_draws" (its standard error from the finite draws, :func:`draw_standard_error`),
        "margin_mean", "margin_std" (over pairs, of the per-pair mean margin),
        "per_draw_accuracy" (fraction of (pair, draw) with u > 0), "n_pairs", "draws", "seed", "beta",
        "batch_size", "heldout_pairs", "skipped" (rows dropped, by reason), "weights", "reference"}``; with
        ``return_draws``, also ``"u"`` and ``"timesteps"``: ``(P, K)`` float64 arrays of each draw's margin and t.
    Raises:
        FileNotFoundError: no data at ``heldout_pairs`` or no exported adapter. ValueError: no usable pair.
    """
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    if reference not in ("run", "base"):
        raise ValueError(f"reference={reference!r} must be 'run' or 'base'")
    device = torch.device(device)
    data_cfg = _heldout_data_config(cfg, heldout_pairs, max_pairs)
    dataset, report = load_preference_dataset(data_cfg)
    family = family_for_index(read_model_index(cfg.model.pretrained_model_name_or_path, cfg.model.revision))
    state = load_exported_adapter(run_dir, family.denoiser_name)
    components, ref = _load_policy(run_dir, cfg, state, dtype, device, reference)
    loader = torch.utils.data.DataLoader(PairDataset(dataset, data_cfg, seed), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate_pairs)
    skipped = dict(report.get("skipped", {}))
    if progress is not None:
        progress.total += len(dataset)
        progress.refresh()
    timesteps: list[torch.Tensor] | None = [] if return_draws else None
    margins = _pair_margins(components, ref, loader, cfg.loss.beta, draws, seed,
                            _EvalAccelerator(device, dtype), skipped, progress, timesteps)
    if not margins:
        raise ValueError(f"no held-out pair of {heldout_pairs} could be decoded: {skipped}")
    u = torch.cat(margins).numpy()  # (P, K)
    report = _accuracy_report(u, draws=draws, seed=seed, beta=float(cfg.loss.beta), batch_size=batch_size,
                              heldout_pairs=heldout_pairs, skipped=skipped, weights=Path(run_dir) / WEIGHT_NAME)
    if return_draws:
        report.update(u=u, timesteps=torch.cat(timesteps).numpy())
    return {**report, "reference": reference}


def draw_standard_error(u: np.ndarray, resamples: int = 2000, seed: int = 0) -> float:
    """The standard error of the implicit-reward accuracy that comes from drawing only K (t, noise) per pair: the
    standard deviation, over ``resamples`` bootstrap resamples, of the accuracy recomputed with each pair's K draws
    resampled with replacement (the pairs kept as they are). 0 when every draw of every pair has the sign of the
    pair's mean; it shrinks slowly as draws are added (only pairs whose mean margin lies within a few standard
    errors, s/sqrt(K), of 0 contribute: for true margins spread smoothly around 0, about as K^(-1/4)).

    Args:
        u: ``(P, K)`` margins, pairs × draws.
        resamples: bootstrap resamples (a seeded ``numpy`` generator: the result is reproducible).
    Returns:
        The standard error, in accuracy units (0 .. 0.5).
    Raises:
        ValueError: ``u`` not 2-dimensional, or ``resamples`` < 2.
    """
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 2 or resamples < 2:
        raise ValueError(f"u must be (pairs, draws) and resamples >= 2, got shape {u.shape}, resamples={resamples}")
    pairs, draws = u.shape
    rng = np.random.default_rng(seed)
    accuracies = np.empty(resamples)
    for r in range(resamples):  # one (P, K) resample at a time: memory stays that of u
        picks = rng.integers(0, draws, size=(pairs, draws))
        accuracies[r] = (np.take_along_axis(u, picks, axis=1).mean(axis=1) > 0).mean()
    return float(accuracies.std(ddof=1))


def _accuracy_report(u: np.ndarray, *, draws: int, seed: int, beta: float, batch_size: int,
                     heldout_pairs: str | Path, skipped: dict[str, int], weights: Path) -> dict[str, Any]:
    """:func:`implicit_reward_accuracy`'s report from the margins ``u`` ``(P, K)`` (pairs × draws)."""
    mean_u = u.mean(axis=1)
    return {
        "accuracy": float((mean_u > 0).mean()), "accuracy_se_draws": draw_standard_error(u, seed=seed),
        "margin_mean": float(mean_u.mean()),
        "margin_std": float(mean_u.std()), "per_draw_accuracy": float((u > 0).mean()), "n_pairs": len(u),
        "draws": draws, "seed": seed, "beta": beta, "batch_size": batch_size,
        "heldout_pairs": str(heldout_pairs), "skipped": skipped, "weights": str(weights),
    }
