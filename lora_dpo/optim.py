"""Optimizers (AdamW, 8-bit AdamW from bitsandbytes) and learning-rate schedules with warmup."""

from __future__ import annotations

import torch


def _import_bitsandbytes():
    try:
        import bitsandbytes as bnb
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
    """AdamW (``adamw``) or bitsandbytes' 8-bit AdamW (``adamw8bit``), from :class:`~lora_dpo.config.OptimConfig`.

    Raises:
        ImportError: ``adamw8bit`` without a working bitsandbytes install (the message says what to do).
    """
    kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, **kw)
    return _import_bitsandbytes().optim.AdamW8bit(params, **kw)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int):
    """A per-optimizer-step schedule from diffusers' ``get_scheduler`` (warmup then constant/linear/cosine)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        optim_cfg.lr_scheduler, optimizer, num_warmup_steps=optim_cfg.lr_warmup_steps, num_training_steps=max_steps,
    )
