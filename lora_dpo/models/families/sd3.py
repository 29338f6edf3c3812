"""Stable Diffusion 3 / 3.5 (Esser et al. 2024, arXiv 2403.03206): an MM-DiT (``SD3Transformer2DModel``; SD3.5 adds
dual-attention layers and QK norm, read from its config) on a 16-channel VAE, conditioned on CLIP-L and CLIP-G
(penultimate states and pooled projections) and T5-XXL, trained on the rectified flow with a static shift (3.0).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lora_dpo.models.families.base import Components
from lora_dpo.models.families.rectified_flow import RectifiedFlowFamily
from lora_dpo.models.families.stable_diffusion import clip_text_config, token_ids
from lora_dpo.models.tiny import build_tokenizer
from lora_dpo.models.tiny_flow import build_t5_tokenizer

# stabilityai/stable-diffusion-3.5-medium (2.5B-parameter transformer) and its text encoders and VAE.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
FLOW_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_L_PROJ = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)
CLIP_G_PROJ = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
              tie_word_embeddings=False)


class SD3(RectifiedFlowFamily):
    """SD3 / SD3.5: ``StableDiffusion3Pipeline`` with ``SD3Transformer2DModel``, CLIP-L + CLIP-G + T5."""

    name = "sd3"
    label = "SD3/SD3.5"
    pipeline_class = StableDiffusion3Pipeline
    pipeline_class_names = frozenset({"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                                      "StableDiffusion3InpaintPipeline"})
    denoiser_class = SD3Transformer2DModel
    text_parts = (("tokenizer", "text_encoder", CLIPTextModelWithProjection),
                  ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection),
                  ("tokenizer_3", "text_encoder_3", T5EncoderModel))
    max_sequence_length = 256
    t5_tokenizer_name = "tokenizer_3"
    # The attention of every joint block, image and caption streams (diffusers' SD3 LoRA training script's default).
    default_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    kohya_spec = ("sd3", "stable-diffusion-v3-medium/lora")
    model_card_tags = ("sd3", "sd3-diffusers")
    tiny_arch = "tiny-sd3"
    recipe_folder = "sd35"
    compel_class_name = None  # compel 2.5 has no SD3 class
    lora_key_markers = (
        (r"(^|[._])joint_blocks[._]", "they name SD3's joint_blocks"),
        (r"^(transformer\.)?transformer_blocks\.\d+\.attn2\.", "they name SD3.5's dual attention (attn2)"),
    )

    def adapter_signature(self, paths: set[str]) -> str | None:
        """Adds SD3's ``context_pre_only`` last block (:func:`context_pre_only`) to the key markers."""
        why = super().adapter_signature(paths)
        if why is None and context_pre_only(paths):
            why = ("its keys: the last joint block has caption projections but no caption output (SD3's "
                   "context_pre_only block)")
        return why

    def _layout(self, model_index: dict) -> bool:
        return "text_encoder_3" in model_index

    @torch.no_grad()
    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": (B, L_clip + L_t5, 4096), "pooled_projections": (B, 2048)}``, as
        ``StableDiffusion3Pipeline.encode_prompt``: the CLIP-L and CLIP-G penultimate states concatenated
        (768 + 1280), zero-padded to T5's width and followed by T5's ``L_t5`` tokens (256 unless the pipeline's T5
        tokenizer takes fewer: :meth:`sequence_length`); the two pooled projections concatenated. A pipeline
        without T5 gets 256 zero tokens in its place."""
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(components.tokenizers[:2], components.text_encoders[:2]):
            out = encoder(token_ids(tokenizer, captions, encoder.device), output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(clip_states, dim=-1)
        if len(components.text_encoders) > 2 and components.text_encoders[2] is not None:
            t5_tok, t5 = components.tokenizers[2], components.text_encoders[2]
            ids = t5_tok(captions, padding="max_length", max_length=self.sequence_length(t5_tok), truncation=True,
                         add_special_tokens=True, return_tensors="pt").input_ids.to(t5.device)
            t5_states = t5(ids)[0].to(clip.dtype)
        else:
            width = components.unet.config.joint_attention_dim
            t5_states = clip.new_zeros(len(captions), self.max_sequence_length, width)
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5_states], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def denoiser_conditioning(self, components: Components, text: dict[str, torch.Tensor], batch,
                              dtype: torch.dtype, images_per_caption: int = 2) -> dict[str, Any]:
        """``encoder_hidden_states (nB, L, D)`` and ``pooled_projections (nB, P)``, repeated per image."""
        return {"encoder_hidden_states": text["encoder_hidden_states"].repeat(images_per_caption, 1, 1).to(dtype),
                "pooled_projections": text["pooled_projections"].repeat(images_per_caption, 1).to(dtype)}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        """``transformer(hidden_states=x_σ, timestep=σ·1000, ...)``: patchified inside the model."""
        return denoiser(hidden_states=noisy, timestep=timesteps, return_dict=False, **conditioning)[0]

    def lora_state_dict(self, source, denoiser_config, **kwargs) -> tuple:
        """``(state, None[, metadata])``: SD3's reader returns no network alphas (its files carry the PEFT config)."""
        out = self.pipeline_class.lora_state_dict(source, **kwargs)
        if kwargs.get("return_lora_metadata"):
            return out[0], None, out[1]
        return out, None

    def kohya_module_name(self, module: str, denoiser_config) -> str:
        raise ValueError(f"{self.label} adapters have no kohya layout in this kit; export them as diffusers or peft")

    def prompt_embeddings(self, conditioning, pipe, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        raise NotImplementedError("compel has no SD3 prompt weighting")

    def build_real_components(self) -> dict[str, Any]:
        t5_tokenizer = build_t5_tokenizer(self.max_sequence_length)
        return dict(
            transformer=SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
            vae=AutoencoderKL(**FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=CLIPTextModelWithProjection(clip_text_config(CLIP_L_PROJ)),
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(CLIP_G_PROJ)),
            text_encoder_3=T5EncoderModel(T5Config(vocab_size=32128, **T5_XXL)),
            tokenizer=build_tokenizer(max_length=77), tokenizer_2=build_tokenizer(max_length=77),
            tokenizer_3=t5_tokenizer,
        )


_BLOCK_MODULE = re.compile(r"^(?:transformer\.)?transformer_blocks\.(\d+)\.(.+)")


def context_pre_only(paths: set[str]) -> bool:
    """SD3's last joint block is ``context_pre_only``: it projects the caption stream (``add_q/k/v_proj``) but has no
    ``to_add_out`` / ``ff_context`` (FLUX's double blocks all have them). True when an adapter's module ``paths``
    show exactly that: the caption output layers on every block with caption projections except the highest one."""
    projections, outputs = set(), set()
    for path in paths:
        match = _BLOCK_MODULE.match(path)
        if not match:
            continue
        block, inner = int(match[1]), match[2]
        if inner.startswith(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")):
            projections.add(block)
        elif inner.startswith(("attn.to_add_out", "ff_context.")):
            outputs.add(block)
    return bool(outputs) and len(projections) > 1 and outputs == projections - {max(projections)}
