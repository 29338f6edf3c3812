"""Tiny SD1.5-style and SDXL-style pipelines built from configs in code, with random weights.

They have the real layouts (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``), so the kit loads them through its normal
loader, and ``StableDiffusionPipeline.from_pretrained`` / ``StableDiffusionXLPipeline.from_pretrained`` open
them. Used by the tests and by the offline demo; no hub access. The VAE downsamples by 2 (two blocks), so a
32 px image becomes a 4 x 16 x 16 latent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

Family = Literal["sd15", "sdxl"]

TOKENIZER_MAX_LENGTH = 32


def build_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH):
    """A byte-level CLIP BPE tokenizer with a character vocabulary (516 tokens) and no download.

    Every byte is a token (with and without the ``</w>`` end-of-word suffix), plus a few merges, so any caption
    tokenizes; ids 0/1 are ``<|startoftext|>``/``<|endoftext|>`` (the end token also pads, as in CLIP).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "f</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def text_config(vocab_size: int, hidden: int = 32, projection_dim: int = 32):
    """A small ``CLIPTextConfig`` (3 layers, 4 heads, ``TOKENIZER_MAX_LENGTH`` positions)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab_size,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="gelu", projection_dim=projection_dim,
    )


def build_noise_scheduler():
    """The SD1.5/SDXL training noise schedule: DDPM, 1000 steps, scaled-linear betas 0.00085 to 0.012, epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )


def build_tiny_components(family: Family = "sd15", seed: int = 0) -> dict:
    """Random-weight components of a tiny pipeline, keyed as the diffusers pipeline expects.

    UNet ``block_out_channels=(32, 64)``, one cross-attention block; SDXL adds a second text encoder with a
    projection and ``addition_embed_type="text_time"`` (micro-conditioning on 6 time ids).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    common = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    if family == "sd15":
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=4)
    elif family == "sdxl":
        unet = UNet2DConditionModel(
            **common, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    else:
        raise ValueError(f"family must be 'sd15' or 'sdxl', not {family!r}")
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    components = dict(unet=unet, vae=vae, scheduler=build_noise_scheduler(), tokenizer=tokenizer)
    if family == "sd15":
        components.update(
            text_encoder=CLIPTextModel(text_config(vocab, 32)), safety_checker=None, feature_extractor=None,
        )
    else:
        components.update(
            text_encoder=CLIPTextModel(text_config(vocab, 32)),
            text_encoder_2=CLIPTextModelWithProjection(text_config(vocab, 32, projection_dim=32)),
            tokenizer_2=build_tokenizer(),
        )
    return components


def build_tiny_pipeline(family: Family = "sd15", seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (``sd15``) or ``StableDiffusionXLPipeline`` (``sdxl``), random weights."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components = build_tiny_components(family, seed)
    if family == "sd15":
        return StableDiffusionPipeline(**components, requires_safety_checker=False)
    return StableDiffusionXLPipeline(**components)


def save_tiny_pipeline(path: str | Path, family: Family = "sd15", seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it to ``path`` (safetensors). Returns the path."""
    path = Path(path)
    build_tiny_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path
