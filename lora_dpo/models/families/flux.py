"""FLUX.1 (Black Forest Labs, 2024; dev / schnell): ``FluxTransformer2DModel`` (19 double-stream and 38
single-stream blocks, rotary positions over ``img_ids`` / ``txt_ids``) on 2 x 2-packed 16-channel latents,
conditioned on T5-XXL states and the CLIP-L pooled output, trained on the rectified flow with a shift that grows
with the image's token count. Guidance-distilled models (FLUX.1-dev) take the guidance scale as an input
(``model.guidance_scale``, 3.5 by default, as diffusers' FLUX training scripts).

kohya / ComfyUI files name the modules after BFL's reference code, with q, k, v (and, in the single blocks, the MLP
input) fused into one linear layer: :data:`KOHYA_DOUBLE`, :data:`KOHYA_SINGLE`, :meth:`Flux.kohya_fused`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from lora_dpo.models.families.base import Components
from lora_dpo.models.families.rectified_flow import RectifiedFlowFamily
from lora_dpo.models.families.sd3 import CLIP_L_PROJ, FLOW_VAE, T5_XXL
from lora_dpo.models.families.stable_diffusion import clip_text_config, token_ids
from lora_dpo.models.tiny import build_tokenizer
from lora_dpo.models.tiny_flow import build_t5_tokenizer

# black-forest-labs/FLUX.1-dev (12B-parameter transformer).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
DEFAULT_GUIDANCE = 3.5

# diffusers module (inside transformer_blocks.i) -> (BFL / kohya module, its position among the fused parts).
KOHYA_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0), "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1), "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", 0), "ff.net.0.proj": ("img_mlp_0", 0), "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0), "ff_context.net.2": ("txt_mlp_2", 0),
    "norm1.linear": ("img_mod_lin", 0), "norm1_context.linear": ("txt_mod_lin", 0),
}
# ... inside single_transformer_blocks.i
KOHYA_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0), "norm.linear": ("modulation_lin", 0),
}
_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


class Flux(RectifiedFlowFamily):
    """FLUX.1: ``FluxPipeline`` with ``FluxTransformer2DModel``, CLIP-L (pooled) + T5, packed latents."""

    name = "flux"
    label = "FLUX.1"
    pipeline_class = FluxPipeline
    pipeline_class_names = frozenset({"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"})
    denoiser_class = FluxTransformer2DModel
    text_parts = (("tokenizer", "text_encoder", CLIPTextModel), ("tokenizer_2", "text_encoder_2", T5EncoderModel))
    max_sequence_length = 512
    t5_tokenizer_name = "tokenizer_2"
    # Attention (image and text streams, both block kinds), the double blocks' feed-forwards and the single blocks'
    # MLP projections; the model's final ``proj_out`` is excluded (:attr:`lora_exclude_modules`).
    default_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                              "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                              "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
    lora_exclude_modules = "proj_out"  # PEFT fullmatch: the model's own output layer, not the blocks' proj_out
    kohya_spec = ("flux1", "flux-1-dev/lora")
    model_card_tags = ("flux", "flux-diffusers")
    tiny_arch = "tiny-flux"
    compel_class_name = "CompelForFlux"
    tiny_options = {"guidance_embeds": True}
    cudnn_attention = False
    lora_key_markers = (
        (r"(^|\.)single_transformer_blocks\.", "they name FLUX's single_transformer_blocks"),
        (r"^lora_unet_(double|single)_blocks_", "they are kohya FLUX names (lora_unet_double_blocks_ / single_blocks_)"),
        (r"(^|\.)(double_blocks|single_blocks)\.\d+\.", "they name BFL's double_blocks / single_blocks"),
    )

    def draw_key(self, model_cfg) -> dict[str, Any]:
        """Adds the guidance scale the transformer is conditioned on (``model.guidance_scale``, default 3.5)."""
        scale = model_cfg.guidance_scale if model_cfg.guidance_scale is not None else DEFAULT_GUIDANCE
        return {**super().draw_key(model_cfg), "guidance_scale": scale}

    def _layout(self, model_index: dict) -> bool:
        return "text_encoder_2" in model_index and "text_encoder_3" not in model_index

    @torch.no_grad()
    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": (B, 512, 4096), "pooled_projections": (B, 768)}``, as
        ``FluxPipeline.encode_prompt``: T5's last hidden state over 512 tokens (fewer where the pipeline's T5 tokenizer
        takes fewer: :meth:`sequence_length`) and CLIP-L's pooled output."""
        clip_tok, t5_tok = components.tokenizers
        clip, t5 = components.text_encoders
        pooled = clip(token_ids(clip_tok, captions, clip.device), output_hidden_states=False).pooler_output
        ids = t5_tok(captions, padding="max_length", max_length=self.sequence_length(t5_tok), truncation=True,
                     return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
        states = t5(ids.to(t5.device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": states, "pooled_projections": pooled.to(states.dtype)}

    def denoiser_conditioning(self, components: Components, text: dict[str, torch.Tensor], batch,
                              dtype: torch.dtype, images_per_caption: int = 2) -> dict[str, Any]:
        """The repeated text states and, for a guidance-distilled transformer, ``guidance`` ``(nB,)``
        (``model.guidance_scale``, default 3.5): every value has one row per image, so a micro-step may take some
        rows of it. ``txt_ids`` and ``img_ids`` (positions, not per image) are built in :meth:`predict`."""
        states = text["encoder_hidden_states"].repeat(images_per_caption, 1, 1).to(dtype)
        kwargs = {"encoder_hidden_states": states,
                  "pooled_projections": text["pooled_projections"].repeat(images_per_caption, 1).to(dtype)}
        if components.unet is not None and components.unet.config.guidance_embeds:
            scale = components.options.get("guidance")
            scale = DEFAULT_GUIDANCE if scale is None else scale
            kwargs["guidance"] = torch.full((states.shape[0],), float(scale), device=states.device)
        return kwargs

    def predict(self, denoiser, noisy, timesteps, conditioning):
        """Packs ``(N, C, h, w)`` into ``(N, h/2·w/2, 4C)`` tokens with their ``img_ids`` (and zero ``txt_ids``, as
        ``FluxPipeline``), calls the transformer with
        ``timestep = σ`` (it scales by 1000 itself, as ``FluxPipeline`` passes ``t / 1000``) and unpacks."""
        n, c, h, w = noisy.shape
        tokens = pack_latents(noisy)
        text_len = conditioning["encoder_hidden_states"].shape[1]
        out = denoiser(hidden_states=tokens, timestep=timesteps.to(noisy.dtype) / 1000,
                       img_ids=latent_image_ids(h // 2, w // 2, noisy.device, noisy.dtype),
                       txt_ids=noisy.new_zeros(text_len, 3), return_dict=False, **conditioning)[0]
        return unpack_latents(out, h, w)

    def lora_state_dict(self, source, denoiser_config, **kwargs) -> tuple:
        """FLUX's reader with its network alphas: ``(state, alphas[, metadata])`` (kohya / XLabs / BFL layouts
        converted)."""
        out = self.pipeline_class.lora_state_dict(source, return_alphas=True, **kwargs)
        return tuple(out)

    def kohya_module_name(self, module: str, denoiser_config) -> str:
        """``lora_unet_{double,single}_blocks_<i>_<BFL name>``; q, k, v (and the single blocks' ``proj_mlp``) share
        one fused stem (:meth:`kohya_fused`). Raises ValueError for a module outside the blocks."""
        return self.kohya_fused(module)[0]

    def kohya_fused(self, module: str, denoiser_config=None) -> tuple[str, int, tuple[str, ...]]:
        """``(stem, part, parts)``: the kohya stem of a diffusers module, its position among the modules fused into
        that stem, and those modules' full diffusers paths in order (one for an unfused module). BFL's names do not
        depend on the config.

        Raises:
            ValueError: a module with no kohya name (outside the blocks, or not a linear layer BFL names).
        """
        match = _BLOCK.fullmatch(module)
        table = {"transformer_blocks": KOHYA_DOUBLE, "single_transformer_blocks": KOHYA_SINGLE}.get(
            match[1] if match else "")
        if not match or match[3] not in table:
            raise ValueError(f"the FLUX module {module!r} has no kohya name (LoRA on the blocks' attention, "
                             "feed-forward, MLP and modulation layers can be exported to kohya)")
        kind, index, inner = match.groups()
        bfl, part = table[inner]
        stem = f"lora_unet_{'double' if kind == 'transformer_blocks' else 'single'}_blocks_{index}_{bfl}"
        parts = tuple(f"{kind}.{index}.{p}" for p in _FUSED.get(bfl, (inner,)))
        return stem, part, parts

    def prompt_embeddings(self, conditioning, pipe, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """compel's ``CompelForFlux`` output as ``prompt_embeds`` (T5) and ``pooled_prompt_embeds`` (CLIP); FLUX.1
        takes no negative prompt without true CFG, so a negative is refused by the caller."""
        return dict(prompt_embeds=conditioning.embeds, pooled_prompt_embeds=conditioning.pooled_embeds)

    def build_real_components(self) -> dict[str, Any]:
        clip = {k: v for k, v in CLIP_L_PROJ.items() if k != "projection_dim"}
        return dict(
            transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
            vae=AutoencoderKL(**FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159),
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
            text_encoder=CLIPTextModel(clip_text_config(clip)),
            text_encoder_2=T5EncoderModel(T5Config(vocab_size=32128, **T5_XXL)),
            tokenizer=build_tokenizer(max_length=77), tokenizer_2=build_t5_tokenizer(self.max_sequence_length),
        )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N, h/2·w/2, 4C)``: each 2 x 2 patch one token, channels-major inside it (FLUX's
    layout)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``(N, h/2·w/2, 4C)`` -> ``(N, C, h, w)``."""
    n, _, channels = tokens.shape
    c = channels // 4
    return tokens.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def latent_image_ids(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """``(rows·cols, 3)`` positions of the packed tokens: ``(0, row, col)``, row-major (FLUX's rotary ids)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)
