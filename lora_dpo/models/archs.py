"""Random-weight pipelines of every registered family, built in memory: the tiny test pipelines and the real-size
architectures (for cost benchmarks).

No weights can be downloaded here, and a step's time and memory depend on the architecture, not on the values of
the weights. Each family gives both (:meth:`lora_dpo.models.families.base.ModelFamily.build_random_components`):
the real sizes are those of ``stable-diffusion-v1-5/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (UNet 860M / 2.57B parameters, the SD VAE, CLIP ViT-L/14 text encoder,
plus OpenCLIP ViT-bigG/14 with projection for SDXL). The tokenizer is the small byte-level one of
:mod:`lora_dpo.models.tiny` padded to 77 tokens: token ids differ from CLIP's, sequence shapes do not. The tiny
pipelines have the real layouts (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; SDXL adds a second text encoder and tokenizer), so the kit loads them through its normal loader
and the family's pipeline class opens them. Their VAE downsamples by 2 (two blocks): a 32 px image becomes a
4 x 16 x 16 latent.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_dpo.models.families import FAMILIES, Components, ModelFamily, get_family

# arch name -> (family, tiny): each family's tiny test pipeline (``tiny``, ``tiny-sdxl``), then its real size.
_ARCHS: dict[str, tuple[ModelFamily, bool]] = {
    **{family.tiny_arch: (family, True) for family in FAMILIES.values()},
    **{name: (family, False) for name, family in FAMILIES.items()},
}
ARCHES = tuple(_ARCHS)


def build_components(arch: str, weight_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     unet_dtype: torch.dtype | None = None, seed: int = 0) -> Components:
    """Frozen random-weight :class:`~lora_dpo.models.families.base.Components` of architecture ``arch`` (one of
    :data:`ARCHES`).

    Modules are created directly on ``device`` in their dtype (``unet_dtype`` or ``weight_dtype`` for the UNet,
    the family's VAE dtype, e.g. fp32 VAE under fp16 for SDXL, as in :func:`lora_dpo.models.loading.load_components`).

    Raises:
        ValueError: an unknown ``arch``.
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {ARCHES}, not {arch!r}")
    family, tiny = _ARCHS[arch]
    return family.build_random_components(tiny, weight_dtype, device, unet_dtype, seed)


def build_tiny_components(family: str = "sd15", seed: int = 0) -> dict:
    """Random-weight components of a tiny pipeline of ``family``, keyed as its diffusers pipeline takes them.

    UNet ``block_out_channels=(32, 64)``, one cross-attention block; SDXL adds a second text encoder with a
    projection and ``addition_embed_type="text_time"`` (micro-conditioning on 6 time ids). Raises ValueError for an
    unknown family.
    """
    return get_family(family).build_tiny_components(seed)


def build_tiny_pipeline(family: str = "sd15", seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (``sd15``) or ``StableDiffusionXLPipeline`` (``sdxl``), random weights."""
    return get_family(family).build_tiny_pipeline(seed)


def save_tiny_pipeline(path: str | Path, family: str = "sd15", seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it to ``path`` (safetensors). Returns the path."""
    path = Path(path)
    build_tiny_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path
