"""The digits-sd3 world: the digits world's data, scorer and AI feedback around a small rectified-flow transformer in
the Stable Diffusion 3 layout, so that Flow-DPO can be shown to align a real flow model on a CPU.

- **base model**: a ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``, ``AutoencoderKL``, CLIP-L, CLIP-G and
  T5 text encoders with their tokenizers, ``FlowMatchEulerDiscreteScheduler``), trained here on the same 1,797 real
  handwritten digits and captions as the UNet world (:mod:`lora_dpo.world.build`):

  - the VAE is the digits world's (read from ``worlds/digits/pipeline``), its latents centred with a shift factor
    as SD3's are: ``z = (x − shift)·scale``, 4 x 8 x 8 for a 32 px image;
  - the transformer cuts the latent into 2 x 2 patches (16 image tokens) and runs 4 joint blocks of 4 heads x 16;
  - the text encoders are small, random and frozen (:func:`lora_dpo.models.tiny_flow.sd3_text_components`), as the
    UNet world's CLIP is. Their T5 tokenizer says its model takes 32 tokens (``model_max_length``), so the kit
    trains and samples the world on 32 T5 tokens instead of SD3's 256; a plain diffusers call needs
    ``max_sequence_length=32`` to sample what the model was trained on;
  - the transformer learns the rectified flow (Esser et al. 2024, arXiv 2403.03206, Eq. 1: velocity ``ε − x_0`` at
    ``x_σ = (1 − σ)·x_0 + σ·ε``) with SD3's logit-normal σ density (Eq. 19), for just enough steps to draw
    recognisable but imperfect digits;
- **scorer** and **preference sets**: as the UNet world's (same classifier, same seeds, the same code), sampled from
  this model.

The folder (default ``worlds/digits-sd3/``, committed) has the UNet world's layout: ``pipeline/``, ``scorer/``,
``prefs/{train,heldout}.parquet``, ``world.json``. ``lora-dpo world build --family sd3`` rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from lora_dpo.feedback.prompts import digit_caption
from lora_dpo.models.families.flow_matching import (
    flow_noised,
    flow_velocity,
    image_seq_len,
    sample_density,
    scheduler_shift,
)
from lora_dpo.models.tiny_flow import sd3_text_components
from lora_dpo.world.build import (
    REPO_DIR,
    CommonWorldConfig,
    build_digits_world,
    latent_posterior,
    sample_accuracy,
    train_denoiser,
)

FLOW_WORLD_DIR = REPO_DIR / "worlds" / "digits-sd3"


@dataclass
class FlowWorldConfig(CommonWorldConfig):
    """The digits-sd3 world; the defaults reproduce the committed ``worlds/digits-sd3``."""

    vae_shift: bool = True
    vae_from: str | None = "worlds/digits/pipeline"  # the digits world's VAE, its latent factors fitted again
    eval_every: int = 50  # the accuracy rises steeply: 0.37, 0.56, 0.70, 0.92 at 700, 750, 800, 850 steps
    # Transformer (SD3Transformer2DModel) on the 4 x 8 x 8 latent.
    patch_size: int = 2
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    t5_max_length: int = 32  # T5 tokens the world is trained and sampled with (SD3: 256)
    scheduler_shift: float = 1.0  # σ shift of sampling and training (SD3 at 1024 px: 3.0; 1.0 leaves σ as drawn)
    transformer_steps: int = 750  # samples ~56% correct (10 seeds a prompt; see eval_every)
    transformer_batch_size: int = 128
    transformer_lr: float = 1e-3
    transformer_warmup_steps: int = 100


def _captions() -> list[str]:
    return [digit_caption(d) for d in range(10)] + [""]


def assemble_flow_pipeline(vae, cfg: FlowWorldConfig) -> StableDiffusion3Pipeline:
    """A ``StableDiffusion3Pipeline`` around ``vae`` (its shift and scaling factors set): the text components of
    seed ``cfg.seed``, a fresh transformer (seed ``cfg.seed``) sized for the VAE's latent and the text widths, and
    the flow scheduler with ``cfg.scheduler_shift``."""
    text = sd3_text_components(cfg.seed, t5_max_length=cfg.t5_max_length)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        text[name].eval().requires_grad_(False)  # frozen, as in SD3
    latent = cfg.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(cfg.seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=cfg.patch_size, in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels, num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
        caption_projection_dim=cfg.num_attention_heads * cfg.attention_head_dim,
        joint_attention_dim=text["text_encoder_3"].config.d_model,
        pooled_projection_dim=text["text_encoder"].config.projection_dim + text["text_encoder_2"].config.projection_dim,
        pos_embed_max_size=latent,
    )
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.scheduler_shift), **text)


def train_transformer(pipe: StableDiffusion3Pipeline, latent_mean, latent_std, labels, cfg: FlowWorldConfig,
                      evaluate=None) -> dict:
    """Train ``pipe.transformer`` in place on the rectified-flow objective in
    :func:`lora_dpo.world.build.train_denoiser`'s loop: per image one σ from SD3's logit-normal density shifted as
    the scheduler shifts, one ε, the velocity target ``ε − x_0``; the text conditioning is
    ``pipe.encode_prompt``'s for the ten captions and the empty one (with the T5 length the kit samples with).

    Args:
        latent_mean, latent_std: ``(N, C, h, w)`` shifted and scaled VAE posterior; ``labels``: ``(N,)`` digits.
        evaluate: optional ``callable(transformer) -> float`` (classifier accuracy of the samples).
    Returns:
        The report of :func:`~lora_dpo.world.build.train_denoiser`.
    """
    captions = _captions()
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                                  max_sequence_length=cfg.t5_max_length)
    tokens = image_seq_len(latent_mean.shape, cfg.patch_size)

    def velocity_loss(model, z, caption, generator):
        noise = torch.randn(z.shape, generator=generator)
        sigmas = scheduler_shift(sample_density("logit_normal", len(z), generator), pipe.scheduler.config, tokens)
        pred = model(hidden_states=flow_noised(z, noise, sigmas), encoder_hidden_states=embeds[caption],
                     pooled_projections=pooled[caption], timestep=sigmas * 1000, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred, flow_velocity(z, noise))

    return train_denoiser(pipe.transformer, velocity_loss, latent_mean, latent_std, labels, cfg,
                          steps=cfg.transformer_steps, batch_size=cfg.transformer_batch_size, lr=cfg.transformer_lr,
                          warmup_steps=cfg.transformer_warmup_steps, desc="transformer", evaluate=evaluate)


def _transformer_stage(cfg: FlowWorldConfig, vae, images: torch.Tensor, labels: np.ndarray, scorer):
    """The SD3-layout world's denoiser. Returns ``(pipeline, "transformer", report)``."""
    pipe = assemble_flow_pipeline(vae, cfg)
    latent_mean, latent_std = latent_posterior(vae, images)

    def evaluate(_transformer) -> float:
        return sample_accuracy(pipe, scorer, cfg.eval_seeds_per_prompt, cfg)

    report = train_transformer(pipe, latent_mean, latent_std, labels, cfg, evaluate)
    report["t5_max_length"] = cfg.t5_max_length
    return pipe, "transformer", report


def build_flow_world(out_dir: str | Path = FLOW_WORLD_DIR, cfg: FlowWorldConfig | None = None, *,
                     with_prefs: bool = True) -> dict:
    """Build the digits-sd3 world into ``out_dir`` (replaced): scorer, VAE, transformer, pipeline, preference
    sets, world.json (:func:`lora_dpo.world.build.build_digits_world`). Cost on a 2-core CPU: ``world.json``
    (``stage_times_s``) and the README."""
    return build_digits_world(out_dir, cfg or FlowWorldConfig(), _transformer_stage, with_prefs=with_prefs)
