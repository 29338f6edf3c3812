"""The pieces a training run is built from, each reading its own section of the recipe: the policy and the frozen
components (:func:`setup_policy`), the training data (:func:`open_training_data`), and the accelerator checks.
:class:`lora_dpo.training.recipe.PreferenceRecipe` puts them together in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_dpo.config import DataConfig, RecipeConfig
from lora_dpo.data.cache import CachedPairDataset, check_cache
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamedPairs
from lora_dpo.data.unpaired import LabeledImages
from lora_dpo.errors import ConfigError
from lora_dpo.models.families import FAMILIES, ModelFamily, family_for_index
from lora_dpo.models.loading import DTYPES, Components, load_components, read_model_index
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


def device_type() -> str:
    """The accelerator a run on this machine gets: ``cuda``, ``xpu``, ``mps`` or ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_device(cfg: RecipeConfig) -> list[str]:
    """What the recipe asks of this machine's accelerator, before any weight loads.

    Returns:
        warnings: 8-bit AdamW without a GPU (bitsandbytes runs it on the CPU, slowly).
    Raises:
        ConfigError: ``train.mixed_precision=fp16`` without a GPU (accelerate refuses fp16 on the CPU).
    """
    device = device_type()
    if device != "cpu":
        return []
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU and this machine has none: set "
                          "train.mixed_precision=no (fp32) or bf16 (which the CPU runs)")
    if cfg.optim.name == "adamw8bit":
        return ["warning: optim.name=adamw8bit on a machine without a GPU: bitsandbytes runs it on the CPU, slowly; "
                "optim.name=adamw is the usual choice there"]
    return []


def family_warning(recipe: str | Path | None, family: str) -> str | None:
    """A warning when ``recipe`` lives in a folder written for another model family (``recipes/sdxl/...`` used on
    an SD1.5 model; folders by :attr:`~lora_dpo.models.families.base.ModelFamily.recipe_folder`): its settings
    (resolution, batch, β) were chosen for that family. None otherwise."""
    written_for = Path(recipe).resolve().parent.name if recipe else None
    folders = {f.recipe_folder or f.name: f for f in FAMILIES.values()}
    if written_for in folders and folders[written_for].name != family:
        model = FAMILIES[family]
        return (f"warning: {recipe} is a recipe for {folders[written_for].label} but the model is "
                f"{model.label}: its settings (data.resolution, batch size, loss.beta) may not fit; the "
                f"recipes/{model.recipe_folder or model.name}/ recipes are written for it")
    return None


def _data_report(cfg: RecipeConfig) -> dict[str, Any]:
    """The data, opened as training opens it: the latent cache's key and counts, the stream's source and columns,
    or the data set's rows (kept and skipped, by reason). Raises what opening it raises."""
    if cfg.data.latent_cache:
        manifest = check_cache(cfg, cfg.data.latent_cache)
        return {"latent_cache": cfg.data.latent_cache, "pairs": manifest["pairs"], "skipped": manifest["skipped"]}
    if cfg.data.streaming:  # opening the stream checks the source and its columns; rows are checked as read
        StreamedPairs(cfg.data, seed=cfg.train.seed)
        return {"streaming": True, "rows": "checked as they are read"}
    return load_preference_dataset(cfg.data)[1]


def recipe_family(cfg: RecipeConfig) -> ModelFamily:
    """The family of the recipe's model (its ``model_index.json`` only), after the family's own check of the recipe
    (:meth:`lora_dpo.models.families.base.ModelFamily.check_recipe`: options that do not fit it).

    Raises:
        ModelLoadError: the model cannot be read or its pipeline is not supported. ConfigError: an option that does
            not fit the family.
    """
    family = family_for_index(read_model_index(cfg.model.pretrained_model_name_or_path, cfg.model.revision))
    family.check_recipe(cfg)
    return family


def check_recipe(cfg: RecipeConfig, with_model: bool = True) -> tuple[str | None, dict[str, Any]]:
    """What ``lora-dpo validate`` checks, loading no weights: the model folder or id (its ``model_index.json`` and
    family), the optimizer (8-bit AdamW needs bitsandbytes), the starting LoRA (safetensors that fit the model), the
    data (:func:`_data_report`), and what the recipe asks of this machine's accelerator (:func:`check_device`).

    Args:
        with_model: False skips the model and the starting LoRA (``validate --no-model``); the family is then None.
    Returns:
        ``(family name or None, data report)``.
    Raises:
        ModelLoadError / ConfigError / FileNotFoundError / ValueError / ImportError: what the first failing check
        raises, with its message.
    """
    family = None
    if with_model:
        family = recipe_family(cfg).name
    check_optimizer_available(cfg.optim)
    if cfg.lora.init_from and with_model:
        check_adapter_fits_model(cfg.lora.init_from, cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    report = _data_report(cfg)
    check_device(cfg)
    return family, report


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(num_threads)`` (None: the count as it is) and put the previous
    count back afterwards, also on error. Yields the count in use.

    Raises:
        ValueError: ``num_threads`` < 1.
    """
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads={num_threads} must be >= 1 (or None: torch's default)")
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextmanager
def attention_kernels(family: ModelFamily, device) -> Iterator[None]:
    """Run the block with the attention kernels the family trains with: on CUDA, a family whose
    :attr:`~lora_dpo.models.families.base.ModelFamily.cudnn_attention` is False gets PyTorch's flash,
    memory-efficient and math kernels only (``torch.nn.attention.sdpa_kernel``, restored on exit); anything else
    runs as it is."""
    if torch.device(device).type != "cuda" or family.cudnn_attention:
        yield
        return
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
