"""Loading a pipeline's parts for training and running one training step's model calls, whatever its family.

Each function reads the pipeline's (or the :class:`Components`') family and calls it
(:mod:`lora_dpo.models.families`): the training loop, the cache and the evaluation call these and never look at the
family themselves. :class:`Components` gathers what training needs from a diffusers pipeline folder (or hub id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from lora_dpo.errors import ModelLoadError
from lora_dpo.models.families import Components, Family, family_for_index
from lora_dpo.models.pretrained import DTYPES, read_model_index, safetensors_only


def detect_family(model_index: dict[str, Any]) -> Family:
    """The registry name of a pipeline's family, from its ``model_index.json``
    (:func:`lora_dpo.models.families.family_for_index`): ``sd15`` for SD 1.x/2.x, ``sdxl`` for SDXL.

    Raises:
        ModelLoadError: another pipeline class (e.g. Flux, SD3), which this kit does not train.
    """
    return family_for_index(model_index).name


def load_components(model_cfg, weight_dtype: torch.dtype, device: torch.device | str = "cpu",
                    unet_dtype: torch.dtype | None = None, encoders: bool = True, unet: bool = True) -> Components:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and a DDPM noise scheduler; freeze all of them.

    Args:
        model_cfg: :class:`lora_dpo.config.ModelConfig`.
        weight_dtype: dtype of the frozen weights (fp32, or fp16/bf16 under mixed precision). Trainable
            parameters are cast back to fp32 later (``adapters.add_lora``).
        device: where the modules are placed.
        unet_dtype: the UNet's dtype when it differs from ``weight_dtype`` (fp32 for full fine-tuning, whose
            master weights must not start from rounded ones).
        encoders: False leaves out the VAE, text encoders and tokenizers (``vae=None``, empty lists; the VAE's
            scaling factor is read from its config): training from a latent cache needs only the UNet.
        unet: False leaves out the UNet (``unet=None``): building a latent cache without reference errors.

    Raises:
        ModelLoadError: see :func:`read_model_index` and :func:`detect_family`; a prediction type other than
            epsilon / v_prediction.
    """
    index = read_model_index(model_cfg.pretrained_model_name_or_path, model_cfg.revision)
    return family_for_index(index).load_components(model_cfg, index, weight_dtype, device, unet_dtype, encoders, unet)


@torch.no_grad()
def encode_posterior(components: Components, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior as ``(mean, std)``, each ``(N, C, H/f, W/f)`` for ``pixel_values`` ``(N, 3, H, W)`` in
    [-1, 1] (:meth:`lora_dpo.models.families.base.ModelFamily.encode_posterior`)."""
    return components.model_family.encode_posterior(components, pixel_values)


@torch.no_grad()
def encode_prompts(components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning for ``B`` captions.

    Returns:
        ``{"encoder_hidden_states": (B, L, D)}``; SDXL adds ``"text_embeds": (B, P)`` (pooled, projected).
        SD1.5: the last hidden state of CLIP ViT-L (D = 768). SDXL: the penultimate hidden states of both
        encoders concatenated (D = 768 + 1280) and the second encoder's projected pooled output (P = 1280).
    """
    return components.model_family.encode_prompts(components, captions)


def unet_conditioning(components: Components, text: dict[str, torch.Tensor], batch, dtype: torch.dtype,
                      images_per_caption: int = 2) -> dict:
    """UNet keyword arguments for the ``2B`` images of a :class:`lora_dpo.data.pairs.PairBatch`.

    The caption of pair i conditions both its images: text tensors ``(B, ...)`` are repeated to ``(2B, ...)``,
    preferred images first (``images_per_caption=1``: one image per caption, an
    :class:`lora_dpo.data.unpaired.ImageBatch`, ``(N, ...)`` as given). SDXL micro-conditioning is per image, from the
    real data: ``time_ids = original_size (h, w) + crop_top_left (top, left) + target_size (h, w)``, shape
    ``(2B, 6)`` (Podell et al. 2023, SDXL §2.2).
    """
    return components.model_family.denoiser_conditioning(components, text, batch, dtype, images_per_caption)


def timestep_sampler(components: Components, latent_shape: Sequence[int]) -> Callable[[torch.Generator], torch.Tensor]:
    """The family's timestep draw as ``sampler(generator) -> (1,)``, for
    :func:`lora_dpo.data.draws.pair_draws` (``sample_timesteps=``): SD1.5/SDXL draw ``t ~ U{0..T-1}``
    (one ``torch.randint``, the draw ``pair_draws`` makes without a sampler). ``latent_shape``: ``(C, h, w)``."""
    return partial(components.model_family.sample_timesteps, components, n=1, latent_shape=tuple(latent_shape))


def add_noise(components: Components, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """The noised latents ``x_t`` ``(N, C, h, w)`` (SD1.5/SDXL: ``noise_scheduler.add_noise``)."""
    return components.model_family.add_noise(components, latents, noise, timesteps)


def training_target(components: Components, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet is trained to predict: ``ε`` (epsilon) or ``v = α_t·ε − σ_t·z`` (v_prediction)."""
    return components.model_family.training_target(components, latents, noise, timesteps)


def predict(components: Components, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
            conditioning: dict[str, Any]) -> torch.Tensor:
    """The denoiser's output for ``noisy`` ``(N, C, h, w)``, shaped like it (SD1.5/SDXL:
    ``denoiser(noisy, timesteps, **conditioning).sample``)."""
    return components.model_family.predict(denoiser, noisy, timesteps, conditioning)


__all__ = ["DTYPES", "Components", "Family", "ModelLoadError", "add_noise", "detect_family", "encode_posterior",
           "encode_prompts", "load_components", "predict", "read_model_index", "safetensors_only",
           "timestep_sampler", "training_target", "unet_conditioning"]
