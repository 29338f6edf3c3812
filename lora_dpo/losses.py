"""Pure tensor functions for the Diffusion-DPO objective.

Source: Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024
(arXiv 2311.12908), Eq. 14, in the convention of the official code (``scale_term = -0.5 * beta_dpo``, errors
averaged over C, H, W). See DESIGN.md §1 for the conversions to other conventions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising error ``e = mean_{C,H,W} (pred - target)²``, computed in fp32.

    Args:
        pred, target: ``(N, C, H, W)`` in any float dtype (fp16/bf16 UNet outputs are upcast first).
    Returns:
        ``(N,)`` float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def diffusion_dpo_loss(
    model_err: torch.Tensor, ref_err: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss per pair, and TRL-named metrics.

    ``u = -0.5·β·[(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]``, ``loss = -log σ(u)`` (Wallace et al. Eq. 14).
    A lower error than the reference on the preferred image raises ``u``; on the rejected image it lowers it.

    Args:
        model_err: ``(2B,)`` policy errors, preferred images first (rows ``0..B-1`` = ``x_w``, ``B..2B-1`` = ``x_l``).
        ref_err: ``(2B,)`` reference errors, same order; treated as constants.
        beta: β in the official code's convention (default 5000).
    Returns:
        ``(loss (B,), metrics)``; metrics are detached ``(B,)`` tensors: ``rewards/chosen``
        ``= -0.5·β·(e_θ(w) - e_ref(w))``, ``rewards/rejected``, ``rewards/margins`` (= u),
        ``rewards/accuracies`` (u > 0, strict, as float), ``mse/chosen``, ``mse/rejected``,
        ``ref_mse/chosen``, ``ref_mse/rejected``.
    Raises:
        ValueError: odd or mismatched lengths.
    """
    if model_err.ndim != 1 or model_err.shape != ref_err.shape or model_err.shape[0] % 2:
        raise ValueError(
            f"model_err {tuple(model_err.shape)} and ref_err {tuple(ref_err.shape)} must both be (2B,), preferred first"
        )
    model_w, model_l = model_err.float().chunk(2)
    ref_w, ref_l = ref_err.detach().float().chunk(2)
    chosen = -0.5 * beta * (model_w - ref_w)
    rejected = -0.5 * beta * (model_l - ref_l)
    margins = chosen - rejected
    loss = -F.logsigmoid(margins)
    metrics = {
        "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": margins,
        "rewards/accuracies": (margins > 0).float(),
        "mse/chosen": model_w, "mse/rejected": model_l, "ref_mse/chosen": ref_w, "ref_mse/rejected": ref_l,
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def sft_loss(model_err_w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning on the preferred images only: the plain denoising loss ``e_θ(w)``.

    The paper's baseline ("SFT", Wallace et al. 2023 §5): no reference model and no rejected image.

    Args:
        model_err_w: ``(B,)`` policy errors on the preferred images.
    Returns:
        ``(loss (B,), {"mse/chosen": (B,)})``.
    """
    if model_err_w.ndim != 1:
        raise ValueError(f"model_err_w must be (B,), got {tuple(model_err_w.shape)}")
    return model_err_w.float(), {"mse/chosen": model_err_w.detach().float()}
