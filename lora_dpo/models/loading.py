"""Model loading and UNet conditioning: **the one place where SD1.5 and SDXL differ**.

Everything the training loop needs from a diffusers pipeline folder (or hub id) is gathered in
:class:`Components`; :func:`encode_prompts` and :func:`unet_conditioning` turn captions and per-image
micro-conditioning into the keyword arguments of ``UNet2DConditionModel.forward``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lora_dpo.errors import ModelLoadError

Family = Literal["sd15", "sdxl"]

_SD15_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
_SDXL_CLASSES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}



def read_model_index(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` as a dict, from a local folder or the hub (config file only).

    Raises:
        ModelLoadError: a local path that does not exist or is not a diffusers pipeline folder, a string that is
            neither a folder nor a hub id, or a hub id that cannot be reached (e.g. offline).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"'{name_or_path}' is not a diffusers pipeline folder (no model_index.json). Pass a folder written "
                "by pipe.save_pretrained(...) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
            )
        return json.loads(index.read_text())
    if not _HUB_ID.match(name_or_path):
        raise ModelLoadError(
            f"model.pretrained_model_name_or_path='{name_or_path}' is neither an existing folder nor a hub id "
            "of the form org/name."
        )
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(name_or_path, revision=revision))
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise ModelLoadError(
            f"could not read model_index.json of hub id '{name_or_path}' ({type(exc).__name__}: {exc}). "
            "Check the id and your network/HF token, or pass a local pipeline folder."
        ) from exc


def detect_family(model_index: dict[str, Any]) -> Family:
    """``sdxl`` if the pipeline has a second text encoder or an SDXL class name, ``sd15`` for SD 1.x/2.x.

    Raises:
        ModelLoadError: another pipeline class (e.g. Flux, SD3), which this kit does not train.
    """
    cls = model_index.get("_class_name", "")
    if cls in _SDXL_CLASSES or "text_encoder_2" in model_index:
        return "sdxl"
    if cls in _SD15_CLASSES or ("unet" in model_index and "text_encoder" in model_index):
        return "sd15"
    raise ModelLoadError(f"pipeline class '{cls}' is not supported: lora-dpo trains SD1.5/2.x and SDXL UNets")


@contextmanager
def safetensors_only(name: str) -> Iterator[None]:
    """Turn the loaders' "no safetensors file" error (weights loaded with ``use_safetensors=True``) into a
    :class:`ModelLoadError` that says why pickle weights are refused and how to convert them."""
    try:
        yield
    except OSError as exc:
        if "safetensors" not in str(exc) and ".bin" not in str(exc):
            raise
        raise ModelLoadError(
            f"could not load the weights of '{name}' as safetensors ({exc}). lora-dpo never reads pickle weights "
            "(.bin/.ckpt: unpickling can run arbitrary code). Convert the pipeline once in a process you trust: "
            "DiffusionPipeline.from_pretrained(path).save_pretrained(new_path, safe_serialization=True)"
        ) from exc


@dataclass
class Components:
    """The frozen pipeline parts plus the UNet that gets trained.

    ``text_encoders``/``tokenizers`` hold one entry for SD1.5 and two for SDXL (CLIP ViT-L, then OpenCLIP
    bigG with projection). ``noise_scheduler`` is a ``DDPMScheduler`` built from the pipeline's scheduler config.
    """

    family: Family
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    prediction_type: str
    model_index: dict[str, Any] = field(default_factory=dict)
    scaling_factor: float | None = None  # the VAE's, when the VAE itself is not loaded (training from a cache)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else float(self.scaling_factor)


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
        ModelLoadError: see :func:`read_model_index`; a prediction type other than epsilon / v_prediction.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    name = model_cfg.pretrained_model_name_or_path
    index = read_model_index(name, model_cfg.revision)
    family = detect_family(index)
    kw = dict(revision=model_cfg.revision)
    wkw = dict(kw, variant=model_cfg.variant, use_safetensors=True)  # never unpickle weights

    scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    if model_cfg.prediction_type is not None:
        scheduler.register_to_config(prediction_type=model_cfg.prediction_type)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(
            f"prediction_type '{prediction_type}' is not supported; set model.prediction_type to epsilon or v_prediction"
        )

    vae_dtype = weight_dtype
    if model_cfg.vae_dtype != "auto":
        vae_dtype = DTYPES[model_cfg.vae_dtype]
    elif family == "sdxl" and weight_dtype == torch.float16:
        vae_dtype = torch.float32  # the original SDXL VAE overflows in fp16

    with safetensors_only(name):
        unet_module = (UNet2DConditionModel.from_pretrained(name, subfolder="unet", torch_dtype=unet_dtype or weight_dtype,
                                                            **wkw) if unet else None)
        if not encoders:
            unet_module.requires_grad_(False).eval().to(device)
            scale = AutoencoderKL.load_config(name, subfolder="vae", **kw).get("scaling_factor", 0.18215)
            return Components(family, unet_module, None, [], [], scheduler, prediction_type, index, float(scale))
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=vae_dtype, **wkw)
        tokenizers = [AutoTokenizer.from_pretrained(name, subfolder="tokenizer", **kw)]
        text_encoders = [CLIPTextModel.from_pretrained(name, subfolder="text_encoder", torch_dtype=weight_dtype, **wkw)]
        if family == "sdxl":
            tokenizers.append(AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw))
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                name, subfolder="text_encoder_2", torch_dtype=weight_dtype, **wkw))
    for module in (unet_module, vae, *text_encoders):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            module.to(device)
    return Components(family, unet_module, vae, text_encoders, tokenizers, scheduler, prediction_type, index)


@torch.no_grad()
def encode_posterior(components: Components, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior ``vae.encode(x).latent_dist`` as ``(mean, std)``.

    Args:
        pixel_values: ``(N, 3, H, W)`` in [-1, 1].
    Returns:
        ``mean, std``: each ``(N, C, H/f, W/f)`` in the VAE's dtype (f = the downsampling factor, 8 for SD; C = 4).
        A latent is :func:`lora_dpo.data.draws.posterior_sample` of them.
    """
    vae = components.vae
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    # contiguous: the posterior's halves are strided views, and a UNet fed a strided latent picks other (channels-last)
    # kernels, which round differently from the same latent read back from a cache
    return dist.mean.contiguous(), dist.std.contiguous()


@torch.no_grad()
def encode_prompts(components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning for ``B`` captions.

    Returns:
        ``{"encoder_hidden_states": (B, L, D)}``; SDXL adds ``"text_embeds": (B, P)`` (pooled, projected).
        SD1.5: the last hidden state of CLIP ViT-L (D = 768). SDXL: the penultimate hidden states of both
        encoders concatenated (D = 768 + 1280) and the second encoder's projected pooled output (P = 1280).
    """
    hidden, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        if components.family == "sd15":
            hidden.append(encoder(ids)[0])
        else:
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
    cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
    if components.family == "sdxl":
        cond["text_embeds"] = pooled
    return cond


def unet_conditioning(components: Components, text: dict[str, torch.Tensor], batch, dtype: torch.dtype,
                      images_per_caption: int = 2) -> dict:
    """UNet keyword arguments for the ``2B`` images of a :class:`lora_dpo.data.pairs.PairBatch`.

    The caption of pair i conditions both its images: text tensors ``(B, ...)`` are repeated to ``(2B, ...)``,
    preferred images first (``images_per_caption=1``: one image per caption, an
    :class:`lora_dpo.data.unpaired.ImageBatch`, ``(N, ...)`` as given). SDXL micro-conditioning is per image, from the
    real data: ``time_ids = original_size (h, w) + crop_top_left (top, left) + target_size (h, w)``, shape
    ``(2B, 6)`` (Podell et al. 2023, SDXL §2.2).
    """
    n = images_per_caption
    hidden = text["encoder_hidden_states"].repeat(n, 1, 1).to(dtype)
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
    if components.family == "sdxl":
        time_ids = torch.cat([batch.original_size, batch.crop_top_left, batch.target_size], dim=1)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": text["text_embeds"].repeat(n, 1).to(dtype),
            "time_ids": time_ids.to(hidden.device, dtype),
        }
    return kwargs


def training_target(components: Components, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet is trained to predict: ``ε`` (epsilon) or ``v = α_t·ε − σ_t·z`` (v_prediction)."""
    if components.prediction_type == "epsilon":
        return noise
    return components.noise_scheduler.get_velocity(latents, noise, timesteps)
