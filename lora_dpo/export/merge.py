"""Fuse a LoRA adapter into the base weights and save the result: a diffusers pipeline folder, or the denoiser alone
(the UNet of SD1.x/2.x and SDXL, the transformer of SD3 and FLUX.1).

The fusing is diffusers' own (``pipe.fuse_lora``: ``W ← W + scale · (lora_alpha / r) · B A`` for every targeted
layer), done in fp32 and cast to the requested dtype afterwards, so half-precision output is rounded once. The
merged folder opens with the family's pipeline class (``StableDiffusionPipeline.from_pretrained``, the SDXL, SD3 or
FLUX class) and needs nothing else: no PEFT, no adapter file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from lora_dpo.export.artifacts import card_base_model, card_front_matter
from lora_dpo.models.families import get_family, pipeline_class
from lora_dpo.models.loading import DTYPES, detect_family, read_model_index, safetensors_only
from lora_dpo.models.lora_files import (
    check_adapter_fits_model,
    load_adapter,
    match_output_mode,
)

log = logging.getLogger(__name__)

MERGE_ADAPTER = "merged"


def merge_adapter(model: str, adapter: str | Path, out: str | Path, *, scale: float = 1.0, unet_only: bool = False,
                  dtype: str = "float32", revision: str | None = None, variant: str | None = None,
                  overwrite: bool = False) -> dict:
    """Fuse ``adapter`` into ``model`` at ``scale`` and write the merged model to ``out``.

    Args:
        model: the base pipeline (hub id or folder) the adapter was trained on.
        adapter: a lora-dpo run folder or a LoRA ``.safetensors`` file (diffusers or kohya layout).
        out: the folder to write: a complete pipeline (``model_index.json``, ``unet/`` or ``transformer/``,
            ``vae/``, ...), or with ``unet_only`` the denoiser's folder alone (``config.json``,
            ``diffusion_pytorch_model.safetensors``: ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or
            ``FluxTransformer2DModel``); its files get the mode of a plain new file (``0o666`` less the umask), its
            card names a local ``model`` by its absolute path.
        unet_only: write the denoiser only (the name is the command line's ``--unet-only``; it means the
            transformer for SD3 and FLUX.1).
        scale: the adapter's strength (1.0 = as trained; the same as ``pipe.set_adapters(name, scale)``).
        dtype: ``float32``, ``float16`` or ``bfloat16`` of the saved weights (fusing is always fp32).
    Returns:
        A report: ``out``, ``adapter`` (the file read), ``scale``, ``dtype``, ``family``, ``modules`` (denoiser
        modules fused), ``seconds``.
    Raises:
        AdapterMismatchError / UnsafeFileError / FileNotFoundError: the adapter does not fit ``model`` or is not a
            safetensors file (checked before any weights load). ModelLoadError: bad ``model``.
        FileExistsError: ``out`` is not empty and ``overwrite`` is False. ValueError: unknown ``dtype``.
    """
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: use float32, float16 or bfloat16")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty: choose another folder or pass --overwrite")
    family = detect_family(read_model_index(str(model), revision))
    file = check_adapter_fits_model(adapter, model, revision)

    t0 = time.perf_counter()
    kwargs = dict(revision=revision, variant=variant, use_safetensors=True)
    with safetensors_only(str(model)):
        pipe = pipeline_class(family).from_pretrained(str(model), **kwargs)  # fp32: the fusing is not rounded
    spec = get_family(family)
    load_adapter(pipe, file, MERGE_ADAPTER)
    denoiser = getattr(pipe, spec.denoiser_name)
    modules = sum(1 for n, _ in denoiser.named_modules() if n.endswith(f"lora_A.{MERGE_ADAPTER}"))
    pipe.fuse_lora(lora_scale=scale, adapter_names=[MERGE_ADAPTER])
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    pipe.to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    cls = spec.denoiser_class.__name__ if unet_only else type(pipe).__name__
    if unet_only:
        getattr(pipe, spec.denoiser_name).save_pretrained(out, safe_serialization=True)
        load = f"{cls}.from_pretrained(\"{out}\")"
    else:
        pipe.save_pretrained(out, safe_serialization=True)
        load = f"{type(pipe).__name__}.from_pretrained(\"{out}\")"
    report = {"out": str(out), "adapter": str(file), "scale": scale, "dtype": dtype, "family": family,
              "modules": modules, "seconds": round(time.perf_counter() - t0, 2)}
    (out / "README.md").write_text(card_front_matter(str(model), family, "merge") + f"""
# Merged: {file.parent.name}

`{card_base_model(model)}` with the LoRA `{file}` fused into its weights at scale {scale} ({modules} {spec.denoiser_name}
modules), saved in {dtype} by lora-dpo merge. Load it without PEFT or the adapter:

```python
from diffusers import {cls}
model = {load}
```
""")
    match_output_mode(out)  # safetensors writes 0600 files: give them the umask's mode, as README.md has
    log.info("merged %s into %s at scale %g: %s", file, model, scale, out)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report
