"""What the UNet families (SD1.x/2.x, SDXL) share: a ``UNet2DConditionModel`` trained on a DDPM schedule (ε or v
targets, integer timesteps), CLIP text encoders and the SD VAE. :mod:`.sd15` and :mod:`.sdxl` subclass
:class:`StableDiffusionFamily` and fill in their text conditioning, kohya names and architectures.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig

from lora_dpo.errors import ModelLoadError
from lora_dpo.models.families.base import Components, ModelFamily
from lora_dpo.models.pretrained import DTYPES, safetensors_only
from lora_dpo.models.tiny import build_tokenizer

# The tiny test pipelines (:mod:`lora_dpo.models.tiny`): a UNet with one cross-attention block, a 2-block VAE
# (a 32 px image becomes a 4 x 16 x 16 latent). Each family adds its cross-attention and conditioning settings.
TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
)
# The real-size parts both families share: the SD VAE and CLIP ViT-L/14 (configs of the released checkpoints).
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)


def build_noise_scheduler() -> DDPMScheduler:
    """The SD1.5/SDXL training noise schedule: DDPM, 1000 steps, scaled-linear betas 0.00085 to 0.012, epsilon."""
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )


def clip_text_config(spec: dict) -> CLIPTextConfig:
    """A real-size ``CLIPTextConfig`` (CLIP's 49408-token vocabulary, 77 positions) with ``spec``'s widths."""
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, layer_norm_eps=1e-5, **spec)


class TextEncoder(NamedTuple):
    """One text encoder of a pipeline: its tokenizer's and its own component names, its class, and the config
    (:func:`clip_text_config` spec) of its real-size architecture."""

    tokenizer: str
    encoder: str
    model_class: type
    real_config: dict


def token_ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    """``(B, model_max_length)`` input ids, padded and truncated to the tokenizer's length, on ``device``."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    ).input_ids.to(device)


class StableDiffusionFamily(ModelFamily):
    """A ``UNet2DConditionModel`` family on the DDPM schedule (Ho et al. 2020) with CLIP text encoders."""

    denoiser_name = "unet"
    denoiser_class = UNet2DConditionModel
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoders: ClassVar[tuple[TextEncoder, ...]]
    """The pipeline's text encoders, in its order."""
    unet_config: ClassVar[dict]
    """The real-size UNet's config."""
    vae_scaling_factor: ClassVar[float]
    """The real VAE's ``scaling_factor``."""
    tiny_unet: ClassVar[dict]
    """The tiny UNet's family settings (cross-attention, conditioning), on top of :data:`TINY_UNET`."""

    @property
    def pipeline_class_names(self) -> frozenset[str]:
        """:attr:`pipeline_class` and its img2img and inpainting variants
        (``StableDiffusionXL{,Img2Img,Inpaint}Pipeline``)."""
        stem = self.pipeline_class.__name__.removesuffix("Pipeline")
        return frozenset(f"{stem}{task}Pipeline" for task in ("", "Img2Img", "Inpaint"))

    def load_components(self, model_cfg, model_index: dict[str, Any], weight_dtype: torch.dtype,
                        device: torch.device | str, unet_dtype: torch.dtype | None, encoders: bool,
                        unet: bool) -> Components:
        name = model_cfg.pretrained_model_name_or_path
        kw = dict(revision=model_cfg.revision)
        wkw = dict(kw, variant=model_cfg.variant, use_safetensors=True)  # never unpickle weights
        scheduler = _noise_scheduler(name, model_cfg.prediction_type, kw)
        prediction_type = scheduler.config.prediction_type
        vae_dtype = self.vae_dtype(weight_dtype) if model_cfg.vae_dtype == "auto" else DTYPES[model_cfg.vae_dtype]
        with safetensors_only(name):
            unet_module = (UNet2DConditionModel.from_pretrained(name, subfolder=self.denoiser_name,
                                                                torch_dtype=unet_dtype or weight_dtype, **wkw)
                           if unet else None)
            if not encoders:
                unet_module.requires_grad_(False).eval().to(device)
                scale = AutoencoderKL.load_config(name, subfolder="vae", **kw).get("scaling_factor", 0.18215)
                return Components(self.name, unet_module, None, [], [], scheduler, prediction_type, model_index,
                                  float(scale))
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=vae_dtype, **wkw)
            tokenizers, text_encoders = [], []
            for part in self.text_encoders:
                tokenizers.append(AutoTokenizer.from_pretrained(name, subfolder=part.tokenizer, **kw))
                text_encoders.append(part.model_class.from_pretrained(name, subfolder=part.encoder,
                                                                      torch_dtype=weight_dtype, **wkw))
        for module in (unet_module, vae, *text_encoders):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
                module.to(device)
        return Components(self.name, unet_module, vae, text_encoders, tokenizers, scheduler, prediction_type,
                          model_index)

    def denoiser_conditioning(self, components: Components, text: dict[str, torch.Tensor], batch,
                              dtype: torch.dtype, images_per_caption: int = 2) -> dict[str, Any]:
        """``{"encoder_hidden_states": (nB, L, D)}``, the caption states repeated ``n = images_per_caption`` times."""
        hidden = text["encoder_hidden_states"].repeat(images_per_caption, 1, 1).to(dtype)
        return {"encoder_hidden_states": hidden}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        return denoiser(noisy, timesteps, **conditioning).sample

    def sample_timesteps(self, components: Components, generator: torch.Generator, n: int,
                         latent_shape: Sequence[int]) -> torch.Tensor:
        return torch.randint(0, components.noise_scheduler.config.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, components, latents, noise, timesteps):
        return components.noise_scheduler.add_noise(latents, noise, timesteps)

    def training_target(self, components, latents, noise, timesteps):
        if components.prediction_type == "epsilon":
            return noise
        return components.noise_scheduler.get_velocity(latents, noise, timesteps)

    def save_lora_weights(self, save_dir: str | Path, layers: dict[str, torch.Tensor], metadata: dict,
                          weight_name: str) -> None:
        self.pipeline_class.save_lora_weights(
            save_dir, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, weight_name=weight_name,
            safe_serialization=True,
        )

    def lora_state_dict(self, source, denoiser_config, **kwargs) -> tuple:
        return self.pipeline_class.lora_state_dict(source, unet_config=denoiser_config, **kwargs)

    def kohya_module_name(self, module: str, denoiser_config) -> str:
        return "lora_unet_" + self.kohya_base_name(module, denoiser_config).replace(".", "_")

    def kohya_base_name(self, module: str, denoiser_config) -> str:
        """The module's name in kohya's UNet (dotted), before ``lora_unet_`` and ``.`` -> ``_``."""
        return module

    def prompt_embeddings(self, conditioning, pipe, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """compel's embeddings ``(1, T, D)``, padded to the same T (a multiple of the tokenizer's
        ``model_max_length``: long prompts are chunked, not truncated)."""
        return dict(prompt_embeds=conditioning.embeds, negative_prompt_embeds=conditioning.negative_embeds)

    def build_tiny_components(self, seed: int = 0) -> dict[str, Any]:
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        unet = UNet2DConditionModel(**TINY_UNET, **self.tiny_unet)
        vae = AutoencoderKL(**TINY_VAE)
        components = dict(unet=unet, vae=vae, scheduler=build_noise_scheduler(), tokenizer=tokenizer)
        components.update(self.tiny_text_encoders(len(tokenizer)))
        return components

    @abstractmethod
    def tiny_text_encoders(self, vocab_size: int) -> dict[str, Any]:
        """The tiny pipeline's text encoders (and second tokenizer), keyed as the pipeline takes them."""

    def build_real_components(self) -> dict[str, Any]:
        tokenizer = build_tokenizer(max_length=77)
        parts = dict(unet=UNet2DConditionModel(**self.unet_config),
                     vae=AutoencoderKL(**SD_VAE, scaling_factor=self.vae_scaling_factor),
                     scheduler=build_noise_scheduler())
        for part in self.text_encoders:
            parts[part.tokenizer] = tokenizer
            parts[part.encoder] = part.model_class(clip_text_config(part.real_config))
        return parts

    def text_component_names(self) -> list[tuple[str, str]]:
        return [(part.tokenizer, part.encoder) for part in self.text_encoders]


def _noise_scheduler(name: str, prediction_type: str | None, kw: dict) -> DDPMScheduler:
    """The pipeline's DDPM training schedule, with ``model.prediction_type`` when set.

    Raises:
        ModelLoadError: a prediction type other than epsilon / v_prediction.
    """
    scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(
            f"prediction_type '{scheduler.config.prediction_type}' is not supported; set model.prediction_type to "
            "epsilon or v_prediction"
        )
    return scheduler
