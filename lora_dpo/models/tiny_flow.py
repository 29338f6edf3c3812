"""Tiny random-weight pipelines of the flow-matching families, Stable Diffusion 3 and FLUX.1, built with no hub access.

Groundwork for the flow-matching families (issue 17): the pipelines have the real layouts (``model_index.json``,
``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``), so ``DiffusionPipeline`` and the
families' pipeline classes open them, and every width that the pipelines tie together is kept consistent:

- **VAE** (both): ``AutoencoderKL`` with 16 latent channels, two blocks (16, 32 channels), so it downsamples by 2:
  a 3 x 32 x 32 image is a 16 x 16 x 16 latent. No quant convs, and a ``shift_factor`` beside ``scaling_factor``
  (the real SD3 / FLUX values): ``z = (mean - shift) * scale``.
- **SD3** (``StableDiffusion3Pipeline``): ``SD3Transformer2DModel`` on the 16-channel latent, patch 2 (a 16 x 16
  latent is 8 x 8 = 64 image tokens), 2 joint blocks of 4 heads x 8 = 32 wide. Text: CLIP-L
  (``CLIPTextModelWithProjection``, hidden 16, projection 16), CLIP-G (the same class, hidden 32, projection 32) and
  T5 (``T5EncoderModel``, d_model 64). The pipeline concatenates the two CLIP penultimate hidden states
  (16 + 32 = 48 wide, 32 tokens), zero-pads them to T5's width 64 and appends the T5 tokens along the sequence:
  ``joint_attention_dim = 64``; the pooled embedding is the two projections concatenated,
  ``pooled_projection_dim = 48``.
- **FLUX** (``FluxPipeline``): ``FluxTransformer2DModel`` on packed latents: each 2 x 2 patch of the 16-channel
  latent is one token of 16 * 4 = 64 channels (``in_channels = 64``; a 16 x 16 latent is 64 tokens), 1 double and
  1 single block of 2 heads x 16, rotary axes (4, 6, 6) summing to the head width. Text: CLIP-L (``CLIPTextModel``,
  hidden 32, its pooled output is ``pooled_projection_dim = 32``) and T5 (d_model 64 = ``joint_attention_dim``).
  ``guidance_embeds=True`` gives the FLUX.1-dev layout (distilled guidance as an input), False the schnell layout.
- **Tokenizers**: CLIP's are the kit's byte-level one (:func:`lora_dpo.models.tiny.build_tokenizer`, 32 tokens); T5's
  is :func:`build_t5_tokenizer`, a small Unigram over words and characters that appends ``</s>``.
- **Scheduler**: ``FlowMatchEulerDiscreteScheduler`` (SD3: shift 3; FLUX: resolution-dependent shift).

Each module is built right after ``torch.manual_seed(seed)``: a seed gives the same weights, whatever was built
before.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from lora_dpo.models.tiny import build_tokenizer, text_config

FLOW_FAMILIES = ("sd3", "flux")
T5_MAX_LENGTH = 512
T5_WIDTH = 64
LATENT_CHANNELS = 16
# The real VAEs' latent statistics (stabilityai/stable-diffusion-3-medium-diffusers, black-forest-labs/FLUX.1-dev).
_VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5
_T5_WORDS = ("a", "an", "the", "of", "photo", "picture", "digit", "number", "on", "in", "with", "and",
             "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
             "black", "white", "red", "blue", "green", "cat", "dog", "background", "handwritten")


def build_t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A small T5 tokenizer (a ``tokenizers`` Unigram model) with no download.

    Ids 0/1/2 are ``<pad>``/``</s>``/``<unk>``, as in T5; then ``▁`` (the word-start marker), a few whole words
    (``▁photo``, ``▁digit``, ...) and every lowercase letter, digit and ASCII punctuation mark, alone and after ``▁``,
    so any lowercase caption tokenizes without ``<unk>`` (upper case maps to ``<unk>``). A post-processor appends
    ``</s>``, and decoding gives the words back. No ``<extra_id_*>`` sentinels (an encoder needs none).
    """
    pieces = dict.fromkeys(_T5_SPECIALS, 0.0)
    pieces["▁"] = -2.0
    pieces.update({"▁" + w: -1.0 for w in _T5_WORDS})
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        pieces.setdefault("▁" + c, -4.0)
        pieces.setdefault(c, -5.0)
    tokenizer = Tokenizer(models.Unigram(list(pieces.items()), unk_id=_T5_SPECIALS.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", _T5_SPECIALS.index("</s>"))])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)


def t5_config(vocab_size: int, d_model: int = T5_WIDTH) -> T5Config:
    """A small T5 v1.1-style encoder config (gated GELU, 2 layers, 4 heads of 16, no dropout)."""
    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False,
    )


def _seeded(seed: int, build):
    """``build()`` right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build()


def _vae(family: str, seed: int) -> AutoencoderKL:
    """A 16-latent-channel ``AutoencoderKL`` downsampling by 2, with the family's scaling and shift factors."""
    scaling, shift = _VAE_FACTORS[family]
    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=False, use_post_quant_conv=False,
    ))


def _t5(seed: int) -> dict:
    tokenizer = build_t5_tokenizer()
    return dict(tokenizer=tokenizer, encoder=_seeded(seed, lambda: T5EncoderModel(t5_config(len(tokenizer)))))


def sd3_text_components(seed: int = 0, t5_max_length: int = T5_MAX_LENGTH) -> dict:
    """The six text components of a small ``StableDiffusion3Pipeline``, random weights, keyed as the pipeline takes
    them: CLIP-L (hidden 16, projection 16), CLIP-G (hidden 32, projection 32), T5 (d_model 64) and their
    tokenizers. ``t5_max_length``: the T5 tokenizer's ``model_max_length``, the T5 tokens the kit trains and samples
    with (:meth:`~lora_dpo.models.families.rectified_flow.RectifiedFlowFamily.sequence_length`). A transformer on
    them takes ``joint_attention_dim = 64`` and ``pooled_projection_dim = 48``."""
    clip_tokenizer = build_tokenizer()
    vocab = len(clip_tokenizer)
    t5_tokenizer = build_t5_tokenizer(t5_max_length)
    return dict(
        text_encoder=_seeded(seed, lambda: CLIPTextModelWithProjection(text_config(vocab, 16, projection_dim=16))),
        tokenizer=clip_tokenizer,
        text_encoder_2=_seeded(seed, lambda: CLIPTextModelWithProjection(text_config(vocab, 32, projection_dim=32))),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=_seeded(seed, lambda: T5EncoderModel(t5_config(len(t5_tokenizer)))), tokenizer_3=t5_tokenizer,
    )


def _sd3_components(seed: int) -> dict:
    """The components of a tiny ``StableDiffusion3Pipeline`` (widths in the module docstring)."""
    text = sd3_text_components(seed)
    pooled = text["text_encoder"].config.projection_dim + text["text_encoder_2"].config.projection_dim
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=pooled, pos_embed_max_size=16,
    ))
    return dict(transformer=transformer, vae=_vae("sd3", seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                **text)


def _flux_components(seed: int, guidance_embeds: bool) -> dict:
    """The components of a tiny ``FluxPipeline`` (widths in the module docstring)."""
    clip_tokenizer = build_tokenizer()
    clip_l = _seeded(seed, lambda: CLIPTextModel(text_config(len(clip_tokenizer), 32)))
    t5 = _t5(seed)
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=clip_l.config.hidden_size,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return dict(
        transformer=transformer, vae=_vae("flux", seed), scheduler=scheduler, text_encoder=clip_l,
        tokenizer=clip_tokenizer, text_encoder_2=t5["encoder"], tokenizer_2=t5["tokenizer"],
    )


def build_tiny_flow_components(family: str, seed: int = 0, guidance_embeds: bool = False) -> dict:
    """Random-weight components of a tiny ``family`` pipeline (``"sd3"`` or ``"flux"``), keyed as its diffusers
    pipeline takes them.

    Raises:
        ValueError: an unknown ``family``, or ``guidance_embeds`` for SD3 (FLUX only).
    """
    if family not in FLOW_FAMILIES:
        raise ValueError(f"family must be one of {FLOW_FAMILIES}, not {family!r}")
    if family == "sd3":
        if guidance_embeds:
            raise ValueError("guidance_embeds is a FLUX option; SD3 has no guidance embedding")
        return _sd3_components(seed)
    return _flux_components(seed, guidance_embeds)


def build_tiny_flow_pipeline(family: str, seed: int = 0, guidance_embeds: bool = False):
    """A tiny ``StableDiffusion3Pipeline`` (``"sd3"``) or ``FluxPipeline`` (``"flux"``), random weights, on the CPU in
    fp32. ``guidance_embeds`` (FLUX only): the FLUX.1-dev layout. Its default size is 32 x 32 for SD3 (the
    transformer's ``sample_size`` 16 times the VAE's factor 2); pass ``height``/``width`` to FLUX (a multiple of 4).
    """
    components = build_tiny_flow_components(family, seed, guidance_embeds)
    pipeline_class = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    return pipeline_class(**components)


def save_tiny_flow_pipeline(path: str | Path, family: str, seed: int = 0, **kw) -> Path:
    """Build a tiny flow pipeline (``kw``: :func:`build_tiny_flow_pipeline`'s options) and ``save_pretrained`` it to
    ``path`` (safetensors). Returns the path."""
    path = Path(path)
    build_tiny_flow_pipeline(family, seed, **kw).save_pretrained(path, safe_serialization=True)
    return path
