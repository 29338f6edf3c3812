"""Stable Diffusion 1.x / 2.x (Rombach et al. 2022, arXiv 2112.10752): one CLIP text encoder, whose last hidden
state conditions the UNet's cross-attention; no pooled embedding, no micro-conditioning.

2.x bases (OpenCLIP ViT-H, width 1024, often v-prediction) load the same way: the encoder, its width and the
prediction type are read from the pipeline folder.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from lora_dpo.models.families.base import Components
from lora_dpo.models.families.stable_diffusion import CLIP_L, StableDiffusionFamily, TextEncoder, token_ids
from lora_dpo.models.tiny import text_config

# The UNet of stable-diffusion-v1-5/stable-diffusion-v1-5 (860M parameters).
UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


class SD15(StableDiffusionFamily):
    """SD1.x/2.x: ``StableDiffusionPipeline``, kohya keys in diffusers module names."""

    name = "sd15"
    label = "SD1.x/2.x"
    pipeline_class = StableDiffusionPipeline
    text_encoders = (TextEncoder("tokenizer", "text_encoder", CLIPTextModel, CLIP_L),)
    compel_class_name = "CompelForSD"
    unet_config = UNET_CONFIG
    vae_scaling_factor = 0.18215
    tiny_unet = dict(cross_attention_dim=32, attention_head_dim=4)
    kohya_spec = ("sd_v1", "stable-diffusion-v1/lora")
    model_card_tags = ("stable-diffusion",)
    tiny_arch = "tiny"

    def matches_layout(self, model_index: dict) -> bool:
        return "unet" in model_index and "text_encoder" in model_index and "text_encoder_2" not in model_index

    def pipeline_kwargs(self) -> dict:
        """No safety checker: it blacks out images it flags, which would corrupt any score."""
        return dict(safety_checker=None, requires_safety_checker=False)

    @torch.no_grad()
    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": (B, L, D)}``: the last hidden state of the CLIP text encoder (D = 768 for
        SD1.x's ViT-L, 1024 for SD2.x's OpenCLIP ViT-H)."""
        hidden = [encoder(token_ids(tokenizer, captions, encoder.device))[0]
                  for tokenizer, encoder in zip(components.tokenizers, components.text_encoders)]
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1)}

    def tiny_text_encoders(self, vocab_size: int) -> dict:
        return dict(text_encoder=CLIPTextModel(text_config(vocab_size, 32)), feature_extractor=None)
