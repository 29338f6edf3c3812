"""Random-weight pipelines with the real SD1.5 and SDXL architectures, built in memory, for cost benchmarks.

No weights can be downloaded here, and a step's time and memory depend on the architecture, not on the values of
the weights. The configurations are those of ``stable-diffusion-v1-5/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (UNet 860M / 2.57B parameters, the SD VAE, CLIP ViT-L/14 text
encoder, plus OpenCLIP ViT-bigG/14 with projection for SDXL). The tokenizer is the small byte-level one of
:mod:`lora_dpo.models.tiny` padded to 77 tokens: token ids differ from CLIP's, sequence shapes do not.
``tiny`` / ``tiny-sdxl`` are the test pipelines of :mod:`lora_dpo.models.tiny`.
"""

from __future__ import annotations

import torch

from lora_dpo.models.loading import Components

ARCHES = ("tiny", "tiny-sdxl", "sd15", "sdxl")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)


def _text_config(spec: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, layer_norm_eps=1e-5, **spec)


def build_components(arch: str, weight_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     unet_dtype: torch.dtype | None = None, seed: int = 0) -> Components:
    """Frozen random-weight :class:`~lora_dpo.models.loading.Components` of architecture ``arch`` (one of :data:`ARCHES`).

    Modules are created directly on ``device`` in their dtype (``unet_dtype`` or ``weight_dtype`` for the UNet,
    fp32 VAE under fp16 for SDXL as in :func:`lora_dpo.models.loading.load_components`).

    Raises:
        ValueError: an unknown ``arch``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lora_dpo.models.tiny import build_noise_scheduler, build_tiny_components, build_tokenizer

    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, not {arch!r}")
    family = "sdxl" if "sdxl" in arch else "sd15"
    torch.manual_seed(seed)
    vae_dtype = torch.float32 if family == "sdxl" and weight_dtype == torch.float16 else weight_dtype
    with torch.device(device):
        if arch.startswith("tiny"):
            parts = build_tiny_components(family, seed)
            unet, vae, tokenizers = parts["unet"], parts["vae"], [parts["tokenizer"]]
            encoders = [parts["text_encoder"]]
            if family == "sdxl":
                tokenizers.append(parts["tokenizer_2"])
                encoders.append(parts["text_encoder_2"])
        else:
            tokenizer = build_tokenizer(max_length=77)
            unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET))
            vae = AutoencoderKL(**SD_VAE, scaling_factor=0.13025 if family == "sdxl" else 0.18215)
            encoders = [CLIPTextModel(_text_config(CLIP_L))]
            tokenizers = [tokenizer]
            if family == "sdxl":
                encoders.append(CLIPTextModelWithProjection(_text_config(OPENCLIP_BIGG)))
                tokenizers.append(tokenizer)
    unet.to(device, unet_dtype or weight_dtype)
    vae.to(device, vae_dtype)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False).eval()
    for encoder in encoders:
        encoder.to(device, weight_dtype)
    return Components(family, unet, vae, encoders, tokenizers, build_noise_scheduler(), "epsilon")
