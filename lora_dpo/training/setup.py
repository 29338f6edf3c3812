"""The pieces a training run is built from, each reading its own section of the recipe: the policy and the frozen
components (:func:`setup_policy`), the training data (:func:`open_training_data`), and the accelerator checks.
:class:`lora_dpo.training.recipe.PreferenceRecipe` puts them together in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from lora_dpo.config import DataConfig, RecipeConfig
from lora_dpo.data.cache import CachedPairDataset, check_cache
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamedPairs
from lora_dpo.data.unpaired import LabeledImages
from lora_dpo.errors import ConfigError
from lora_dpo.models.loading import DTYPES, Components, detect_family, load_components, read_model_index
from lora_dpo.models.lora_files import check_adapter_fits_model
from lora_dpo.models.policy import Policy, build_policy
from lora_dpo.training.optim import check_optimizer_available


def setup_policy(cfg: RecipeConfig, device, components: Components | None = None,
                 init_lora: str | Path | None = None, encoders: bool = True,
                 precomputed_reference: bool = False) -> tuple[Components, Policy, torch.dtype]:
    """Load the frozen components in the weight dtype of ``train.mixed_precision`` and build the policy.

    Args:
        components: already built components to use instead of loading ``cfg.model`` (the benchmarks pass
            random-weight real-size ones; in full mode their UNet must be fp32).
        init_lora: the starting LoRA to read instead of ``cfg.lora.init_from`` (the run folder's copy).
        encoders: False loads only the UNet (training from a latent cache).
        precomputed_reference: the reference errors come from the cache: full mode builds no frozen copy.
    Returns:
        ``(components, policy, weight dtype)``: see :func:`lora_dpo.models.policy.build_policy`.
    """
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    if components is None:
        unet_dtype = torch.float32 if cfg.train.mode == "full" else weight_dtype
        components = load_components(cfg.model, weight_dtype, device, unet_dtype=unet_dtype, encoders=encoders)
    policy = build_policy(cfg, components.unet, device, components.family, init_lora, precomputed_reference)
    return components, policy, weight_dtype


def open_training_data(data: DataConfig, unit: str, seed: int, manifest: dict | None) -> tuple[Any, dict[str, Any]]:
    """The training data set and its report: the latent cache's pairs (``manifest``: its checked ``cache.json``),
    None for a stream (``data.streaming``: opened per process once the processes are known, never stored), or the
    kept rows of :func:`lora_dpo.data.sources.load_preference_dataset`. ``unit == "images"`` (KTO) reads them as
    labeled images: an unpaired set's rows, or each pair's preferred (desirable) and rejected image."""
    if data.latent_cache:
        dataset = CachedPairDataset(data.latent_cache, data, seed, manifest)
        report = {**manifest["data_report"], "latent_cache": data.latent_cache, "skipped_when_cached": manifest["skipped"]}
    elif data.streaming:
        dataset, report = None, {"dataset": data.dataset, "streaming": True}
    else:
        dataset, report = load_preference_dataset(data)
    if unit == "images":
        dataset = LabeledImages(dataset, data, seed)
        report = {**report, "labeled_images": len(dataset)}
    return dataset, report


def check_accumulation(accelerator, steps: int) -> None:
    """The recipe's gradient accumulation (``steps``) is the one accelerate runs; raises ConfigError when an
    accelerate or DeepSpeed config sets another."""
    if accelerator.gradient_accumulation_steps != steps:
        raise ConfigError(
            f"the accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps} but the "
            f"recipe says train.gradient_accumulation_steps={steps}: set it in the recipe only (leave it out of the "
            'accelerate config, or "auto" in a DeepSpeed config)'
        )


def fill_deepspeed_config(accelerator, batch_size: int, max_grad_norm: float | None) -> None:
    """Under DeepSpeed, set the config's ``"auto"`` values it cannot read off a DataLoader: the micro-batch size and
    the gradient clipping (0: none). Anything else: nothing to do."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", batch_size), ("gradient_clipping", max_grad_norm or 0.0)):
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value


def check_recipe(cfg: RecipeConfig) -> tuple[str, dict[str, Any]]:
    """What ``lora-dpo validate`` checks, loading no weights: the model folder or id (its ``model_index.json`` and
    family), the optimizer (8-bit AdamW needs bitsandbytes), the starting LoRA (safetensors that fit the model), and
    the data, opened as training opens it: the latent cache's key and counts, the stream's source and columns, or the
    data set's rows (kept and skipped, by reason).

    Returns:
        ``(family name, data report)``.
    Raises:
        ModelLoadError / ConfigError / FileNotFoundError / ValueError / ImportError: what the first failing check
        raises, with its message.
    """
    family = detect_family(read_model_index(cfg.model.pretrained_model_name_or_path, cfg.model.revision))
    check_optimizer_available(cfg.optim)
    if cfg.lora.init_from:
        check_adapter_fits_model(cfg.lora.init_from, cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    if cfg.data.latent_cache:
        manifest = check_cache(cfg, cfg.data.latent_cache)
        return family, {"latent_cache": cfg.data.latent_cache, "pairs": manifest["pairs"],
                        "skipped": manifest["skipped"]}
    if cfg.data.streaming:  # opening the stream checks the source and its columns; rows are checked as read
        StreamedPairs(cfg.data, seed=cfg.train.seed)
        return family, {"streaming": True, "rows": "checked as they are read"}
    _, report = load_preference_dataset(cfg.data)
    return family, report
