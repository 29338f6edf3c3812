"""LoRA adapters on the UNet (PEFT), and the disabled-adapter reference.

The policy is the base UNet plus trainable LoRA; the reference is the same UNet with its adapters disabled,
so one UNet sits in memory. This is exact only while the adapter starts at zero (PEFT's default init sets
LoRA B = 0), which :func:`add_lora` guarantees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

ADAPTER_NAME = "default"


def _lora_layers(unet: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(unet: torch.nn.Module, lora_cfg) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach a fresh LoRA adapter named ``default``, keep its parameters in fp32.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any weight dtype).
        lora_cfg: :class:`lora_dpo.config.LoraConfig` (``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``).
    Returns:
        The trainable parameters (LoRA A and B matrices), fp32.
    Raises:
        ValueError: no module of the UNet matches ``lora.target_modules``.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha, target_modules=list(lora_cfg.target_modules),
        lora_dropout=lora_cfg.lora_dropout, init_lora_weights=True,
    )
    try:
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise ValueError(
            f"lora.target_modules={list(lora_cfg.target_modules)} matches no UNet module ({exc}); "
            "the attention projections are to_q, to_k, to_v, to_out.0"
        ) from exc
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # mixed precision: the frozen base may be fp16/bf16, the adapter stays fp32
        p.data = p.data.float()
    return params


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


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT naming (``...to_q.lora_A.weight``), detached, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore adapter weights saved by :func:`lora_state_dict` into the existing ``default`` adapter (in place).

    Raises:
        ValueError: keys missing or unexpected (the checkpoint was made with another ``lora`` section).
    """
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"checkpoint adapter does not match the recipe's lora section (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); resume with the recipe.yaml saved in the run folder"
        )
