"""Stable Diffusion XL (Podell et al. 2023, arXiv 2307.01952): two CLIP text encoders, a pooled text embedding
and per-image micro-conditioning (§2.2) added to the UNet's time embedding, and kohya keys in Stability's SGM
module names.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lora_dpo.models.families.base import Components
from lora_dpo.models.families.stable_diffusion import CLIP_L, StableDiffusionFamily, TextEncoder, token_ids
from lora_dpo.models.pretrained import read_component_config
from lora_dpo.models.tiny import build_tokenizer, text_config

# The UNet of stabilityai/stable-diffusion-xl-base-1.0 (2.57B parameters) and its second text encoder, OpenCLIP
# ViT-bigG/14 with projection.
UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)

# Diffusers module -> Stability (SGM / "ldm") module of the SDXL UNet, outside the down/mid/up blocks and inside a
# resnet. Checked against diffusers' single-file SDXL converter (``convert_ldm_unet_checkpoint``) and its kohya
# LoRA reader (``_maybe_map_sgm_blocks_to_diffusers``, ``_convert_unet_lora_key``).
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(attentions|resnets|downsamplers|upsamplers)"
                    r"\.(\d+)\.(.+)")


def sgm_name(module: str, cfg: dict) -> str:
    """The SGM name of a diffusers SDXL UNet module (``down_blocks.1.attentions.0.X`` -> ``input_blocks.4.1.X``).

    With L = ``layers_per_block``: ``down_blocks.d.{attentions,resnets}.l`` -> ``input_blocks.{1 + d(L+1) +
    l}.{1,0}``, ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1`` -> ``middle_block.0`` / ``.1`` / ``.2``,
    ``up_blocks.u.{attentions,resnets}.l`` -> ``output_blocks.{u(L+1) + l}.{1,0}``; inside a transformer nothing
    changes, inside a resnet ``conv1``/``conv2``/``time_emb_proj``/``conv_shortcut`` -> ``in_layers.2``/
    ``out_layers.3``/``emb_layers.1``/``skip_connection``; ``downsamplers.0.conv`` -> ``input_blocks.{(d+1)(L+1)}.0.op``,
    ``upsamplers.0.conv`` -> ``output_blocks.{u(L+1) + L}.2.conv`` (``.1.conv`` in a block without attention, which
    diffusers' reader misreads; SDXL has none); plus ``conv_in``, ``conv_out``, ``time_embedding``, ``add_embedding``.

    Raises:
        ValueError: a module without an SGM name, or a config without ``layers_per_block`` (the message names it).
    """
    if module in _SGM_TOP:
        return _SGM_TOP[module]
    match = _BLOCK.fullmatch(module)
    per = cfg.get("layers_per_block")
    if not match or not isinstance(per, int):
        raise ValueError(f"cannot map the UNet module {module!r} to a kohya SDXL name (layers_per_block={per})")
    kind, block, part, layer, inner = match.groups()
    block, layer, stride = int(block or 0), int(layer), per + 1
    if part == "resnets":
        if inner not in _SGM_RESNET:
            raise ValueError(f"cannot map the UNet module {module!r} to a kohya SDXL name (unknown resnet part)")
        inner = _SGM_RESNET[inner]
    if kind == "mid_block":  # middle_block.0 = resnets.0, .1 = attentions.0, .2 = resnets.1
        return f"middle_block.{1 if part == 'attentions' else 2 * layer}.{inner}"
    if kind == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{(block + 1) * stride}.0.{'op' if inner == 'conv' else inner}"
        return f"input_blocks.{1 + block * stride + layer}.{1 if part == 'attentions' else 0}.{inner}"
    if part == "upsamplers":  # after the resnet and, in a cross-attention block, the transformer
        slot = 2 if "CrossAttn" in cfg.get("up_block_types", ("",) * (block + 1))[block] else 1
        return f"output_blocks.{block * stride + per}.{slot}.{inner}"
    return f"output_blocks.{block * stride + layer}.{1 if part == 'attentions' else 0}.{inner}"


class SDXL(StableDiffusionFamily):
    """SDXL: ``StableDiffusionXLPipeline``, CLIP ViT-L plus OpenCLIP bigG with projection, pooled text and size
    conditioning."""

    name = "sdxl"
    label = "SDXL"
    pipeline_class = StableDiffusionXLPipeline
    text_encoders = (TextEncoder("tokenizer", "text_encoder", CLIPTextModel, CLIP_L),
                     TextEncoder("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection, OPENCLIP_BIGG))
    compel_class_name = "CompelForSDXL"
    unet_config = UNET_CONFIG
    vae_scaling_factor = 0.13025
    tiny_unet = dict(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                     projection_class_embeddings_input_dim=6 * 8 + 32)
    kohya_spec = ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")
    model_card_tags = ("stable-diffusion-xl",)
    tiny_arch = "tiny-sdxl"

    def matches_layout(self, model_index: dict) -> bool:
        return "unet" in model_index and "text_encoder_2" in model_index

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """fp32 under fp16 weights: the original SDXL VAE overflows in fp16."""
        return torch.float32 if weight_dtype == torch.float16 else weight_dtype

    @torch.no_grad()
    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": (B, L, 768 + 1280), "text_embeds": (B, 1280)}``: the penultimate hidden
        states of both encoders concatenated, and the second encoder's projected pooled output."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
            out = encoder(token_ids(tokenizer, captions, encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def denoiser_conditioning(self, components: Components, text: dict[str, torch.Tensor], batch,
                              dtype: torch.dtype, images_per_caption: int = 2) -> dict[str, Any]:
        """Adds ``added_cond_kwargs``: ``text_embeds`` ``(nB, 1280)`` and, per image from the real data,
        ``time_ids = original_size (h, w) + crop_top_left (top, left) + target_size (h, w)``, ``(nB, 6)``
        (Podell et al. 2023, §2.2)."""
        kwargs = super().denoiser_conditioning(components, text, batch, dtype, images_per_caption)
        time_ids = torch.cat([batch.original_size, batch.crop_top_left, batch.target_size], dim=1)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": text["text_embeds"].repeat(images_per_caption, 1).to(dtype),
            "time_ids": time_ids.to(kwargs["encoder_hidden_states"].device, dtype),
        }
        return kwargs

    def kohya_base_name(self, module: str, denoiser_config) -> str:
        """:func:`sgm_name`; ``denoiser_config``: the UNet config (``unet.config``, a dict, its ``config.json`` or
        the base model folder)."""
        return sgm_name(module, read_component_config(denoiser_config, "unet"))

    def prompt_embeddings(self, conditioning, pipe, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """Adds ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds`` ``(1, P)`` (compel's ``CompelForSDXL``:
        both encoders' penultimate hidden states, not normalized; pooled from the second encoder, from the raw
        prompt, syntax included). An empty negative prompt zeros, as ``pipe(prompt)``
        (``force_zeros_for_empty_prompt``)."""
        out = conditioning
        kwargs = dict(prompt_embeds=out.embeds, negative_prompt_embeds=out.negative_embeds,
                      pooled_prompt_embeds=out.pooled_embeds, negative_pooled_prompt_embeds=out.negative_pooled_embeds)
        if not negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
            for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
                kwargs[key] = torch.zeros_like(kwargs[key])
        return kwargs

    def tiny_text_encoders(self, vocab_size: int) -> dict:
        return dict(text_encoder=CLIPTextModel(text_config(vocab_size, 32)),
                    text_encoder_2=CLIPTextModelWithProjection(text_config(vocab_size, 32, projection_dim=32)),
                    tokenizer_2=build_tokenizer())
