"""LoRA adapters on the UNet (PEFT), and the reference they are compared against.

The policy is the base UNet plus trainable LoRA; the reference is the same UNet with its adapters disabled,
so one UNet sits in memory. This is exact only while the adapter starts at zero (PEFT's default init sets
LoRA B = 0), which :func:`add_lora` guarantees.

Training on top of an existing LoRA (``lora.init_from``, :func:`add_lora_from`) loads it twice: as the trainable
``default`` adapter (the policy starts from it) and as a frozen second adapter ``reference``; the reference pass
switches to that adapter (:func:`adapter_active`): "reference = adapters disabled" would be the base model, not the
LoRA the run starts from. Two adapters cost a few MB; merging the LoRA into the base instead would
make the exported adapter a delta that only fits the merged weights, while this way it loads onto the base model
like the LoRA it came from.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from lora_dpo.models.families import get_family
from lora_dpo.models.lora_files import check_adapter_fits, resolve_lora_file

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
REFERENCE_ADAPTER = "reference"


def _lora_layers(unet: torch.nn.Module) -> list:
    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(unet: torch.nn.Module, lora_cfg, family: str = "sd15") -> list[torch.nn.Parameter]:
    """Freeze the denoiser, attach a fresh LoRA adapter named ``default``, keep its parameters in fp32.

    Args:
        unet: the denoiser (``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``; any
            weight dtype, or with bitsandbytes layers: PEFT wraps those too).
        lora_cfg: :class:`lora_dpo.config.LoraConfig` (``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``);
            ``target_modules`` None takes the family's ``default_target_modules``.
        family: the registry name of the denoiser's family.
    Returns:
        The trainable parameters (LoRA A and B matrices), fp32.
    Raises:
        ValueError: no module of the UNet matches ``lora.target_modules``.
    """
    unet.requires_grad_(False)
    spec = get_family(family)
    targets = list(lora_cfg.target_modules or spec.default_target_modules)
    config = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha, target_modules=targets, lora_dropout=lora_cfg.lora_dropout,
        init_lora_weights=True, exclude_modules=spec.lora_exclude_modules,
    )
    try:
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise ValueError(
            f"lora.target_modules={targets} matches no {spec.denoiser_name} module ({exc}); the {spec.label} "
            f"default is {', '.join(spec.default_target_modules)}"
        ) from exc
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # mixed precision: the frozen base may be fp16/bf16, the adapter stays fp32
        p.data = p.data.float()
    return params


def _adapter_params(unet: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if ".lora_" in n and f".{name}." in n]


def add_lora_from(unet: torch.nn.Module, path, family: str) -> list[torch.nn.Parameter]:
    """Freeze the denoiser and load an existing LoRA twice: the trainable ``default`` and the frozen ``reference``.

    The file's own shape wins (rank, alpha, target modules, per-module patterns: its diffusers metadata, or what
    diffusers infers from a kohya / A1111 file); both copies are kept in fp32, so at step 0 the policy and the
    reference compute exactly the same errors (u = 0, loss = ln 2).

    Args:
        unet: the denoiser without adapters: ``UNet2DConditionModel`` (SD1.x/2.x, SDXL), ``SD3Transformer2DModel`` or
            ``FluxTransformer2DModel``; the file's keys are read under the family's ``denoiser_name`` prefix
            (``unet.`` / ``transformer.``).
        path: the LoRA (file or folder; safetensors only, see :func:`lora_dpo.models.lora_files.resolve_lora_file`).
        family: the registry name of the denoiser's family (:mod:`lora_dpo.models.families`), whose pipeline reader
            converts kohya keys (FLUX: BFL's fused names) and returns its network alphas.
    Returns:
        The trainable parameters (the ``default`` adapter's A and B matrices), fp32.
    Raises:
        AdapterMismatchError: the LoRA was made for another model or family (checked before anything loads:
            :func:`lora_dpo.models.lora_files.check_adapter_fits`). UnsafeFileError: not a safetensors file.
        ValueError: the LoRA has dropout (it would make policy and reference differ at step 0).
    """
    file = resolve_lora_file(path)
    check_adapter_fits(file, unet, family)
    state, alphas, metadata = get_family(family).lora_state_dict(
        str(file.parent), unet.config, weight_name=file.name, use_safetensors=True, return_lora_metadata=True,
    )
    if any(k.startswith("text_encoder") for k in state):
        log.warning("%s also holds text-encoder LoRA weights: lora-dpo trains the UNet only, so policy and reference "
                    "use its UNet part, and the exported adapter holds no text-encoder weights", file)
    unet.requires_grad_(False)
    for name in (REFERENCE_ADAPTER, ADAPTER_NAME):
        with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            unet.load_lora_adapter(dict(state), prefix=get_family(family).denoiser_name, adapter_name=name, network_alphas=alphas,
                                   metadata=metadata)
    if unet.peft_config[ADAPTER_NAME].lora_dropout:
        raise ValueError(f"{file} was saved with lora_dropout={unet.peft_config[ADAPTER_NAME].lora_dropout}: dropout "
                         "makes the policy differ from the reference; re-save the LoRA with lora_dropout=0")
    for layer in _lora_layers(unet):
        layer.set_adapter(ADAPTER_NAME)
    for p in _adapter_params(unet, REFERENCE_ADAPTER):
        p.data = p.data.float()
        p.requires_grad_(False)
    params = _adapter_params(unet, ADAPTER_NAME)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextmanager
def adapter_active(unet: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    """Run the UNet with only adapter ``name`` active inside the block (e.g. the frozen ``reference`` LoRA).

    PEFT's ``set_adapter`` also flips ``requires_grad``; the active adapters and every ``requires_grad`` flag are
    restored in ``finally``. Use it under ``torch.no_grad()``, outside the policy's backward.
    """
    layers = _lora_layers(unet)
    if not any(name in layer.lora_A for layer in layers):
        raise ValueError(f"the UNet has no adapter named {name!r}")
    previous = [list(layer.active_adapters) for layer in layers]
    grad_flags = [(p, p.requires_grad) for p in unet.parameters()]
    for layer in layers:
        layer.set_adapter(name, inference_mode=True)
    try:
        yield unet
    finally:
        for layer, active in zip(layers, previous):
            layer.set_adapter(active)
        for p, flag in grad_flags:
            p.requires_grad_(flag)


@contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the base UNet (the DPO reference) inside the block; restore the adapters' state on exit.

    PEFT's disable/enable also flips ``requires_grad`` of the LoRA weights; both the enabled state and every
    ``requires_grad`` flag are restored in ``finally``, so an exception inside the block never leaves the policy
    broken. Use it under ``torch.no_grad()`` and leave it before the policy's ``backward()`` (gradient
    checkpointing re-runs the forward during backward).
    """
    layers = _lora_layers(unet)
    if not layers:
        raise ValueError("the UNet has no LoRA adapter to disable; call add_lora first")
    was_disabled = [layer.disable_adapters for layer in layers]
    grad_flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.disable_adapters()
    try:
        yield unet
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for p, flag in grad_flags:
            p.requires_grad_(flag)


def lora_state_dict(unet: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT naming (``...to_q.lora_A.weight``), detached, on the CPU; taken from
    ``state_dict`` (the UNet's whole state, e.g. gathered from FSDP shards) when given, else from ``unet``."""
    state = get_peft_model_state_dict(unet, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore adapter weights saved by :func:`lora_state_dict` into the existing ``default`` adapter (in place).

    Raises:
        ValueError: keys missing or unexpected (the checkpoint was made with another ``lora`` section).
    """
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or [])  # the frozen reference LoRA is not saved
               if "lora_" in k and f".{REFERENCE_ADAPTER}." not in k]
    if unexpected or missing:
        raise ValueError(
            f"checkpoint adapter does not match the recipe's lora section (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); resume with the recipe.yaml saved in the run folder"
        )
