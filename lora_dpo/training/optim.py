"""Optimizers (AdamW, 8-bit AdamW from bitsandbytes, Adafactor from transformers) and LR schedules with warmup."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from transformers.optimization import Adafactor


def _import_bitsandbytes():
    try:
        import bitsandbytes as bnb  # optional: bitsandbytes (adamw8bit only)
    except Exception as exc:  # ImportError, or a broken native library
        raise ImportError(
            f"optim.name=adamw8bit needs bitsandbytes ({exc}); `pip install bitsandbytes` or use optim.name=adamw"
        ) from exc
    return bnb


def check_optimizer_available(optim_cfg) -> None:
    """Fail before any weight loads when the chosen optimizer's library is missing (raises ImportError)."""
    if optim_cfg.name == "adamw8bit":
        _import_bitsandbytes()


def build_optimizer(params: list[torch.nn.Parameter], optim_cfg) -> torch.optim.Optimizer:
    """The optimizer named by :class:`~lora_dpo.config.OptimConfig` over ``params``.

    - ``adamw``: ``torch.optim.AdamW`` (two fp32 moments per parameter: 8 bytes/parameter of state).
    - ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (blockwise 8-bit moments, about 2 bytes/parameter; tensors under
      4096 elements keep 32-bit state).
    - ``adafactor``: ``transformers.Adafactor`` with a fixed learning rate (``scale_parameter=False,
      relative_step=False``, update clipping 1.0), as the official Diffusion-DPO SDXL runs; factored second
      moments (row + column statistics per matrix), no first moment: the smallest state of the three.

    Raises:
        ImportError: ``adamw8bit`` without a working bitsandbytes install (the message says what to do).
    """
    kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, **kw)
    if optim_cfg.name == "adafactor":
        return Adafactor(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    return _import_bitsandbytes().optim.AdamW8bit(params, **kw)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int):
    """A per-optimizer-step schedule from diffusers' ``get_scheduler`` (warmup then constant/linear/cosine)."""
    return get_scheduler(
        optim_cfg.lr_scheduler, optimizer, num_warmup_steps=optim_cfg.lr_warmup_steps, num_training_steps=max_steps,
    )
