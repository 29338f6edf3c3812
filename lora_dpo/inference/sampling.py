"""Seeded, batched image generation with a diffusers text-to-image pipeline.

Every image has its own CPU ``torch.Generator`` seeded with its own seed, and the pipeline receives one generator
per image, so image i depends only on (prompt i, seed i) and the pipeline's weights: the same (prompt, seed)
gives the same image whatever the batching, and a base model and the same model with an adapter, sampled with
the same seeds, start from the same initial noise and are directly comparable.

:func:`fused_adapters` folds a pipeline's LoRA adapters into its weights for a block of sampling (one matmul per
adapted layer instead of three, and none of the adapter wrapper's small ops: the tuned model samples at the base
model's cost) and puts the saved base weights back afterwards, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import transformers.utils.logging as transformers_logging
from diffusers.utils import logging as diffusers_logging
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from lora_dpo.models.families import family_for_index, family_of_pipeline
from lora_dpo.models.pretrained import read_model_index, safetensors_only


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars ("Loading pipeline components", "Loading weights") off
    for the block; each library's setting as it was afterwards."""
    libraries = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in libraries:
            if enabled:
                lib.enable_progress_bar()


def _adapter_layers(pipe) -> list[BaseTunerLayer]:
    """The PEFT layers of the pipeline's models (the denoiser, ``unet`` or SD3 / FLUX ``transformer``, the text
    encoders, ...) whose active adapters are on and not
    yet merged: the ones :func:`fused_adapters` fuses."""
    models = [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]
    return [layer for model in models for layer in model.modules()
            if isinstance(layer, BaseTunerLayer) and not layer.disable_adapters and not layer.merged
            and layer.active_adapters]


@contextmanager
def fused_adapters(pipe) -> Iterator[int]:
    """Fuse the pipeline's active LoRA adapters into the base weights for the block; restore them after it.

    Each adapted layer's base weights become ``W + scaling · B A`` (PEFT's ``merge``: the same adapters and scales
    the unfused forward applies), so the block samples with one matmul per layer. The base layers' parameters are
    copied (to the CPU) before the fusing and copied back after the block, also on error, so afterwards the
    weights equal the weights before bit for bit, the adapters are unfused and active as before. Fused outputs
    differ from unfused ones by floating-point rounding only (the same sum in another order). A pipeline
    without adapters (or with them disabled) is left as it is. Yields the number of layers fused.

    Memory: one copy of the adapted layers' base weights on the CPU while the block runs.
    """
    layers = _adapter_layers(pipe)
    saved = [(p, p.detach().to("cpu", copy=True)) for layer in layers for p in layer.get_base_layer().parameters()]
    try:
        for layer in layers:
            layer.merge()
        yield len(layers)
    finally:
        try:
            for layer in layers:
                if layer.merged:
                    layer.unmerge()  # PEFT's bookkeeping (the merged flag); the weights come from the saved copies
        finally:
            with torch.no_grad():
                for param, copy in saved:
                    param.copy_(copy)


DEFAULT_GUIDANCE_SCALE = 3.0  # the sampler's guidance when neither the caller nor the recipe sets one


def sampling_guidance(given: float | None, model_guidance: float | None) -> float:
    """The guidance scale to sample a run's model with: ``given``, else the recipe's ``model.guidance_scale``
    (FLUX.1-dev's distilled guidance, as it trained), else :data:`DEFAULT_GUIDANCE_SCALE`."""
    return next(g for g in (given, model_guidance, DEFAULT_GUIDANCE_SCALE) if g is not None)


def generate_images(pipe, prompts: list[str], seeds: list[int], *, num_inference_steps: int = 20,
                    guidance_scale: float = 3.0, height: int | None = None, width: int | None = None,
                    batch_size: int = 64, progress: bool = False,
                    on_batch: Callable[[int], None] | None = None) -> list[Image.Image]:
    """Generate one image per (prompt, seed): ``images[i] = pipe(prompts[i])`` drawn with
    ``torch.Generator("cpu").manual_seed(seeds[i])``.

    Args:
        pipe: a diffusers text-to-image pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``StableDiffusion3Pipeline``, ``FluxPipeline``) whose ``__call__`` takes ``prompt``, ``generator``,
            ``num_inference_steps``, ``guidance_scale``, ``height``, ``width`` and ``output_type``. Its scheduler
            is used as configured. SD3 / FLUX also get the T5 length their T5 tokenizer allows
            (:meth:`~lora_dpo.models.families.base.ModelFamily.sampling_kwargs`).
        prompts, seeds: same length N; seeds are integers (``manual_seed`` range).
        num_inference_steps, guidance_scale: passed to the pipeline (classifier-free guidance when > 1; FLUX.1:
            the distilled guidance input of the transformer, one pass per step).
        height, width: image size in pixels; None = the pipeline's default (denoiser sample size × VAE factor;
            FLUX.1: 1024, whatever the model, so pass them for a small one).
        batch_size: images per pipeline call; changes speed and memory only, not the images (up to
            floating-point reduction order, which on CPU leaves pixels unchanged in practice).
        progress: show the pipeline's per-step progress bar (otherwise disabled via
            ``pipe.set_progress_bar_config(disable=True)``; the setting stays on the pipeline).
        on_batch: called after each pipeline call with the number of images it made (e.g. a caller's progress
            bar's ``update``).

    Returns:
        N RGB PIL images, in the order of ``prompts``.

    Raises:
        ValueError: ``prompts`` and ``seeds`` differ in length, or ``batch_size`` < 1.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pipe.set_progress_bar_config(disable=not progress)
    family_kwargs = family_of_pipeline(pipe).sampling_kwargs(pipe)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        out = pipe(
            prompt=chunk, generator=_generators(seeds[start:start + batch_size]),
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            output_type="pil", **family_kwargs,
        )
        images.extend(img.convert("RGB") for img in out.images)
        if on_batch is not None:
            on_batch(len(out.images))
    return images


def load_pipeline(model: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  revision: str | None = None, variant: str | None = None):
    """A diffusers pipeline of the model's family (read from ``model_index.json``: SD1.5, SDXL, SD3, FLUX) for
    sampling and scoring, with the family's :meth:`~lora_dpo.models.families.base.ModelFamily.pipeline_kwargs`.

    SD1.5's safety checker is left out: it blacks out images it flags, which would corrupt any score. The
    pipeline's progress bar is off, and so are the loading bars (:func:`quiet_loading`). Only safetensors weights are read. Raises :class:`lora_dpo.errors.ModelLoadError`
    for a bad path or id, an unsupported pipeline, or pickle-only weights.
    """
    family = family_for_index(read_model_index(str(model), revision))
    kwargs: dict = dict(revision=revision, variant=variant, use_safetensors=True)
    if dtype != torch.float32:
        kwargs["torch_dtype"] = dtype
    kwargs.update(family.pipeline_kwargs())
    with safetensors_only(str(model)), quiet_loading():
        pipe = family.pipeline_class.from_pretrained(str(model), **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
