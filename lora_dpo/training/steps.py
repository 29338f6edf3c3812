"""The micro-steps: one micro-batch in, the loss per example and its metrics out.

A loss type's row in :data:`lora_dpo.losses.LOSSES` names its step kind; :data:`MICRO_STEPS` resolves it:

- ``"pairs"``: :func:`dpo_micro_step`, B preference pairs (or their cached posteriors), each pair's two images
  sharing one noise draw and one timestep;
- ``"images"``: :func:`kto_micro_step`, N labeled images, each its own draw.

Both noise through :func:`noised_latents`, run the reference pass (if the loss has one) before the policy pass, and
hand the errors to the row's ``per_example`` function.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from lora_dpo.config import LossConfig
from lora_dpo.data.cache import CachedBatch
from lora_dpo.data.draws import pair_draws, posterior_sample
from lora_dpo.data.unpaired import ImageBatch
from lora_dpo.losses import LossInputs, per_sample_mse
from lora_dpo.models.loading import (
    Components,
    add_noise,
    encode_posterior,
    encode_prompts,
    predict,
    timestep_sampler,
    training_target,
    unet_conditioning,
)

Reference = Callable[[], AbstractContextManager[torch.nn.Module]]


def noised_latents(components: Components, mean: torch.Tensor, std: torch.Tensor, draw_seeds: list[int],
                   pairs: bool, weight_dtype: torch.dtype):
    """The UNet's inputs and target for a micro-batch of posteriors, from the keyed draws (:mod:`lora_dpo.data.draws`).

    Args:
        mean, std: the VAE posterior, ``(2B, C, h, w)`` preferred first when ``pairs`` (each pair's images then share
            the pair's noise and timestep, as in Wallace et al. 2023, Eq. 14), else ``(N, C, h, w)`` of N images with
            one seed each (each its own noise and timestep: SFT's preferred images, KTO's labeled images).
        draw_seeds: ``B`` (pairs) or ``N`` seeds; an image of N takes the first posterior sample of its seed's draws.
    Returns:
        ``(noisy latents in weight_dtype, target float32, timesteps long)``, all ``mean.shape[0]`` rows.
    """
    num_train_timesteps = components.noise_scheduler.config.num_train_timesteps
    eps_z, noise, timesteps = pair_draws(draw_seeds, mean.shape[1:], num_train_timesteps, mean.device,
                                         timestep_sampler(components, mean.shape[1:]))
    latents = posterior_sample(mean, std, eps_z[: mean.shape[0]], components.latent_scale)
    if pairs:
        noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy = add_noise(components, latents, noise, timesteps).to(weight_dtype)
    return noisy, training_target(components, latents, noise, timesteps), timesteps


def _reference_pass(components: Components, reference: Reference, noisy, timesteps, cond, target,
                    accelerator) -> torch.Tensor:
    """The reference's per-sample errors, under ``no_grad`` inside ``reference()`` and the policy's autocast."""
    with torch.no_grad(), reference() as ref_unet, accelerator.autocast():
        return per_sample_mse(predict(components, ref_unet, noisy, timesteps, cond), target)


def dpo_micro_step(components: Components, unet, reference: Reference, batch, loss: LossConfig, accelerator,
                   weight_dtype: torch.dtype):
    """Policy (and, for the losses that need it, reference) errors for one micro-batch of ``B`` pairs, and the loss
    per pair (the ``"pairs"`` step of :data:`lora_dpo.losses.LOSSES`; ``"images"`` is :func:`kto_micro_step`).

    One timestep and one noise draw per pair, shared by its two images (Wallace et al. 2023, Eq. 14), with the
    posterior samples, all from the pair's keyed seed (``batch.draw_seeds``, :mod:`lora_dpo.data.draws`): a pair gets
    the same draws in any batch, on any process. The reference pass runs first, under ``no_grad`` inside
    ``reference()`` (:meth:`lora_dpo.models.policy.Policy.reference`: the adapter disabled, or the frozen copy); the
    policy pass (with grad) follows, so an adapter is enabled again before ``backward()`` re-runs checkpointed
    segments. A cached batch with precomputed reference errors (``batch.ref_mse``, whose seeds are the cached draws')
    runs no reference pass; so do the reference-free losses (``mapo``, ``sft``). A ``preferred_only`` loss (``sft``)
    runs only the ``B`` preferred images through the policy. ``loss.sdpo_mu`` adds the ``sdpo/loser_scale`` metric,
    ``loss.sft_weight`` the anchor.

    Args:
        unet: the policy as called for training (possibly wrapped by accelerate/DDP).
        reference: a no-argument callable returning a context manager that yields the reference UNet.
        batch: a :class:`lora_dpo.data.pairs.PairBatch` (``2B`` images, preferred first) or a
            :class:`lora_dpo.data.cache.CachedBatch` (their cached posteriors).
    Returns:
        ``(loss (B,), metrics dict of (B,) tensors)`` from the row's ``per_example`` (:mod:`lora_dpo.losses`).
    """
    spec = loss.spec
    T = components.noise_scheduler.config.num_train_timesteps
    batch = batch.to(accelerator.device)
    num_pairs = batch.num_pairs
    rows = slice(0, num_pairs) if spec.preferred_only else slice(None)  # SFT: the B preferred images only
    cached = isinstance(batch, CachedBatch)
    if cached:
        mean, std = batch.latent_mean[rows], batch.latent_std[rows]
    else:
        mean, std = encode_posterior(components, batch.pixel_values[rows])  # (2B, C, h, w), preferred first
    noisy, target, timesteps = noised_latents(components, mean, std, batch.draw_seeds, not spec.preferred_only,
                                              weight_dtype)
    text = batch.text if cached else encode_prompts(components, batch.captions)
    cond = unet_conditioning(components, text, batch, weight_dtype)

    if spec.preferred_only:
        cond = {k: _rows(v, rows) for k, v in cond.items()}
        with accelerator.autocast():
            pred = predict(components, unet, noisy, timesteps, cond)
        return spec.per_example(LossInputs(per_sample_mse(pred, target), None, pred, target, T), loss)
    ref_mse = None
    if loss.needs_reference and cached and batch.ref_mse is not None:
        ref_mse = batch.ref_mse
    elif loss.needs_reference:
        ref_mse = _reference_pass(components, reference, noisy, timesteps, cond, target, accelerator)
    with accelerator.autocast():
        pred = predict(components, unet, noisy, timesteps, cond)
    model_err = per_sample_mse(pred, target)
    per_pair, metrics = spec.per_example(LossInputs(model_err, ref_mse, pred, target, T), loss)
    if loss.sft_weight:  # the SFT anchor on the preferred images
        per_pair = per_pair + loss.sft_weight * model_err[:num_pairs]
    metrics["timestep"] = timesteps[:num_pairs].float()
    return per_pair, metrics


def kto_micro_step(components: Components, unet, reference: Reference, batch: ImageBatch, loss: LossConfig,
                   accelerator, weight_dtype: torch.dtype):
    """Diffusion-KTO (the ``"images"`` step) for one micro-batch of ``N`` labeled images: reference and policy errors,
    the reference point z and the loss per image (:func:`lora_dpo.losses.kto_loss`).

    Each image has its own keyed noise, timestep and posterior sample (:func:`noised_latents`, ``pairs=False``). The
    reference pass runs first under ``no_grad`` inside ``reference()``, as in :func:`dpo_micro_step`. z is the mean
    implicit reward of the micro-batch over every process (``accelerator.reduce``: every process calls this step in
    lockstep), clamped at 0. ``loss.sft_weight`` adds ``w·e_θ`` on the desirable images.

    Args:
        batch: an :class:`lora_dpo.data.unpaired.ImageBatch`.
    Returns:
        ``(loss (N,), metrics)``: :func:`lora_dpo.losses.kto_loss`'s, plus ``timestep`` ``(N,)``.
    """
    batch = batch.to(accelerator.device)
    mean, std = encode_posterior(components, batch.pixel_values)
    noisy, target, timesteps = noised_latents(components, mean, std, batch.draw_seeds, False, weight_dtype)
    cond = unet_conditioning(components, encode_prompts(components, batch.captions), batch, weight_dtype,
                             images_per_caption=1)
    ref_mse = _reference_pass(components, reference, noisy, timesteps, cond, target, accelerator)
    with accelerator.autocast():
        pred = predict(components, unet, noisy, timesteps, cond)
    model_err = per_sample_mse(pred, target)
    inputs = LossInputs(model_err, ref_mse, pred, target, components.noise_scheduler.config.num_train_timesteps,
                        desirable=batch.desirable, reduce=lambda t: accelerator.reduce(t, "mean"))
    per_image, metrics = loss.spec.per_example(inputs, loss)
    if loss.sft_weight:  # the SFT anchor on the desirable images
        per_image = per_image + loss.sft_weight * model_err * batch.desirable
    metrics["timestep"] = timesteps.float()
    return per_image, metrics


# The micro-step of each step kind of lora_dpo.losses.LOSSES.
MICRO_STEPS = {"pairs": dpo_micro_step, "images": kto_micro_step}


def _rows(value, rows: slice):
    """The given batch rows of a conditioning tensor or of a dict of them (SDXL's added_cond_kwargs)."""
    return {k: v[rows] for k, v in value.items()} if isinstance(value, dict) else value[rows]
