"""The losses of ``loss.type``, as pure tensor functions, and :data:`LOSSES`, the one table that declares each type.

Every loss works on per-sample denoising errors ``e`` (:func:`per_sample_mse`), ``(2B,)`` with the preferred images
first, and returns ``(loss (B,), metrics)`` with TRL's metric names. The paired losses that compare against a
reference share the implicit log-ratio of Wallace et al., "Diffusion Model Alignment Using Direct Preference
Optimization", CVPR 2024 (arXiv 2311.12908), Eq. 14, in the convention of the official code
(``scale_term = -0.5 * beta_dpo``, errors averaged over C, H, W)::

    h = -0.5·[(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]        rewards/margins u = β·h

- ``sigmoid`` (:func:`diffusion_dpo_loss`): ``-log σ(βh)``; with label smoothing ε, conservative DPO
  (Mitchell 2023, as TRL): ``-(1-ε)·log σ(βh) - ε·log σ(-βh)``;
- ``ipo`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
  arXiv 2310.12036, Eq. 17, with τ = β): ``(h - 1/(2β))²``: h is pulled to the target 1/(2β), not pushed without
  bound. (The diffusers research script's IPO branch reads an ``args.beta`` its parser never defines: it raises on
  the first step.)
- ``hinge`` (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization", arXiv 2309.06657,
  as TRL): ``max(0, 1 - βh)``;
- :func:`mapo_loss` (reference-free), :func:`kto_loss` (unpaired), :func:`sft_loss`, and the safeguard of
  :func:`sdpo_loser_scale`.

This module sits below everything but torch: :mod:`lora_dpo.config` validates ``loss.*`` against :data:`LOSSES`,
training resolves each row's micro-step kind (:mod:`lora_dpo.training.steps`), the model card reads its wording.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SUM, COUNT = ":sum", ":count"


def masked_sums(name: str, values: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A metric that is a mean over some of a micro-batch's examples, as a sum and a count to add up over a step and
    across processes: ``{f"{name}:sum": (), f"{name}:count": ()}`` (0-dim float32).
    :func:`lora_dpo.training.diagnostics.ratio_means` turns the step's totals back into ``name``.

    Args:
        values: ``(N,)``. mask: ``(N,)`` bool, the examples the mean is over.
    """
    mask = mask.bool()
    return {name + SUM: values.detach().float()[mask].sum(), name + COUNT: mask.float().sum()}


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


PAIRED_TYPES = ("sigmoid", "ipo", "hinge")  # the losses of the implicit log-ratio h against a reference


def diffusion_dpo_loss(
    model_err: torch.Tensor, ref_err: torch.Tensor, beta: float, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, loser_scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss per pair (or its IPO / hinge variant, see the module docstring), and TRL-named metrics.

    ``u = -0.5·β·[(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]``, ``loss = -log σ(u)`` (Wallace et al. Eq. 14).
    A lower error than the reference on the preferred image raises ``u``; on the rejected image it lowers it.

    Args:
        model_err: ``(2B,)`` policy errors, preferred images first (rows ``0..B-1`` = ``x_w``, ``B..2B-1`` = ``x_l``).
        ref_err: ``(2B,)`` reference errors, same order; treated as constants.
        beta: β in the official code's convention (default 5000); IPO's τ.
        loss_type: ``sigmoid``, ``ipo`` or ``hinge``.
        label_smoothing: ε of conservative DPO, ``sigmoid`` only, in [0, 0.5).
        loser_scale: λ of :func:`sdpo_loser_scale`: the rejected images' errors enter with their value unchanged
            but their gradient times λ (Diffusion-SDPO's straight-through form); None: 1.
    Returns:
        ``(loss (B,), metrics)``; metrics are detached ``(B,)`` tensors: ``rewards/chosen``
        ``= -0.5·β·(e_θ(w) - e_ref(w))``, ``rewards/rejected``, ``rewards/margins`` (= u),
        ``rewards/accuracies`` (u > 0, strict, as float), ``mse/chosen``, ``mse/rejected``,
        ``ref_mse/chosen``, ``ref_mse/rejected``.
    Raises:
        ValueError: odd or mismatched lengths, an unknown ``loss_type``, label smoothing outside [0, 0.5) or with
            another type than ``sigmoid``.
    """
    if model_err.ndim != 1 or model_err.shape != ref_err.shape or model_err.shape[0] % 2:
        raise ValueError(
            f"model_err {tuple(model_err.shape)} and ref_err {tuple(ref_err.shape)} must both be (2B,), preferred first"
        )
    if loss_type not in PAIRED_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {PAIRED_TYPES}")
    if not 0.0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5), and only with loss_type=sigmoid")
    model_w, model_l = model_err.float().chunk(2)
    ref_w, ref_l = ref_err.detach().float().chunk(2)
    if loser_scale is not None:  # value unchanged, gradient times λ
        model_l = model_l.detach() + loser_scale * (model_l - model_l.detach())
    chosen = -0.5 * beta * (model_w - ref_w)
    rejected = -0.5 * beta * (model_l - ref_l)
    margins = chosen - rejected
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(margins)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margins)
    elif loss_type == "ipo":
        h = margins / beta
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = torch.relu(1 - margins)
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


def sdpo_loser_scale(pred: torch.Tensor, target: torch.Tensor, mu: float, eps: float = 1e-9) -> torch.Tensor:
    """The Diffusion-SDPO safeguard's λ (Fu et al. 2025, "Diffusion-SDPO: Safeguarded Direct Preference Optimization
    for Diffusion Models", arXiv 2511.03317; the official ``get_adaptive_lose_l_scale``): the largest scale of the
    rejected images' gradient, in [0, 1], for which a step along ``-∇A + λ∇B`` does not raise the preferred images'
    error A to first order, with margin μ: ``(-∇A + λ∇B)·∇A <= -μ‖∇A‖²``.

    A and B are the mean squared errors of the preferred and rejected halves; their gradients with respect to the
    predictions, ``g_A = 2(pred_w - target_w)/n`` and ``g_B = 2(pred_l - target_l)/n``, are taken in output space
    (the pair's images share their noise, so the halves line up element by element). Then
    ``λ = clip((1-μ)·‖g_A‖² / (g_A·g_B + eps), 0, 1)`` when ``g_A·g_B > 0``, else 1: one λ per micro-batch.

    Args:
        pred, target: ``(2B, C, H, W)``, preferred first; used detached.
        mu: μ in [0, 1) (the official launchers: 0.9 for SD1.5, 0.6 for SDXL).
    Returns:
        λ, a detached float32 scalar tensor.
    """
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"mu={mu} must be in [0, 1)")
    pred_w, pred_l = pred.detach().float().chunk(2)
    target_w, target_l = target.detach().float().chunk(2)
    n = pred_w.numel()
    grad_a = (2.0 / n) * (pred_w - target_w).flatten()
    grad_b = (2.0 / n) * (pred_l - target_l).flatten()
    dot = torch.dot(grad_a, grad_b)
    cap = (1.0 - mu) * grad_a.pow(2).sum() / (dot + eps)
    return torch.where(dot > 0, cap, torch.ones_like(cap)).clamp(0.0, 1.0)


def mapo_loss(model_err: torch.Tensor, beta: float = 0.1, alpha: float = 0.5,
              num_train_timesteps: int = 1000) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MaPO, margin-aware preference optimisation without a reference model (Hong et al. 2024, "Margin-aware
    Preference Optimization for Aligning Diffusion Models without Reference", arXiv 2406.06424; the official
    ``mapo-t2i/mapo`` train.py).

    Each error becomes a log-likelihood-like score ``f(e) = αe / (exp(αe) - 1)`` (decreasing in e; f(0) = 1, its
    limit), and per pair ``loss = e_θ(w) - β·log σ(T·[f(e_θ(w)) - f(e_θ(l))])``: the preferred image's denoising
    loss plus an odds-ratio term that widens the margin, T scaling it to the whole denoising process.

    Args:
        model_err: ``(2B,)`` policy errors, preferred first.
        beta, alpha, num_train_timesteps: β (0.1), α (the code's ``snr_value``, 0.5) and T (1000), the paper's.
    Returns:
        ``(loss (B,), metrics)``: ``rewards/chosen`` ``= T·f(e_θ(w))``, ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies`` (margin > 0), ``mse/chosen``, ``mse/rejected`` (all detached ``(B,)``).
    """
    if model_err.ndim != 1 or model_err.shape[0] % 2:
        raise ValueError(f"model_err {tuple(model_err.shape)} must be (2B,), preferred first")
    model_w, model_l = model_err.float().chunk(2)

    def score(e: torch.Tensor) -> torch.Tensor:  # x / (exp(x) - 1), stable, 1 at x = 0
        x = alpha * e
        safe = torch.where(x == 0, torch.ones_like(x), x)
        return torch.where(x == 0, torch.ones_like(x), safe / torch.expm1(safe))

    chosen, rejected = num_train_timesteps * score(model_w), num_train_timesteps * score(model_l)
    margins = chosen - rejected
    loss = model_w - beta * F.logsigmoid(margins)
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": margins,
               "rewards/accuracies": (margins > 0).float(), "mse/chosen": model_w, "mse/rejected": model_l}
    return loss, {k: v.detach() for k, v in metrics.items()}


def kto_loss(model_err: torch.Tensor, ref_err: torch.Tensor, desirable: torch.Tensor, beta: float,
             reference_point: torch.Tensor, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-KTO on unpaired images (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility",
    arXiv 2404.04465, its objective with the sigmoid utility; the official ``jacklishufan/diffusion-kto``).

    Per image, the implicit reward ``g = e_ref - e_θ`` (lower error than the reference: positive), shifted by the
    reference point z and signed by its label: ``loss = λ_y·(1 - σ(s·β·(g - z)))``, s = +1 for a desirable image,
    -1 for an undesirable one, λ_y its weight. β multiplies g directly (the official ``scale_term = beta_dpo``, no
    0.5 as in Diffusion-DPO; its default 1000).

    Args:
        model_err, ref_err: ``(N,)`` errors of N images (each its own noise and t); ``ref_err`` is a constant.
        desirable: ``(N,)`` bool labels.
        reference_point: z, a scalar: the batch mean of g over every process, clamped at 0 and detached
            (:func:`kto_reference_point`).
    Returns:
        ``(loss (N,), metrics)``, TRL's KTO names: ``kl`` (z, ``(N,)``) and, as :func:`masked_sums`
        (means over the images of one label, summed and counted so that they add up over a step),
        ``rewards/chosen`` / ``rewards/rejected`` (β·g of the desirable / undesirable images; TRL calls them chosen
        and rejected) and ``mse/chosen`` / ``mse/rejected`` (their e_θ).
    Raises:
        ValueError: the three inputs are not all ``(N,)``.
    """
    if model_err.shape != ref_err.shape or model_err.shape != desirable.shape or model_err.ndim != 1:
        raise ValueError("model_err, ref_err and desirable must all be (N,)")
    desirable = desirable.bool()
    g = ref_err.detach().float() - model_err.float()
    sign = desirable.float() * 2 - 1
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    loss = weight * (1 - torch.sigmoid(sign * beta * (g - reference_point)))
    reward = beta * g.detach()
    z = torch.as_tensor(reference_point, dtype=torch.float32, device=model_err.device).detach()
    metrics = {"kl": z.expand(model_err.shape[0]),
               **masked_sums("rewards/chosen", reward, desirable), **masked_sums("rewards/rejected", reward, ~desirable),
               **masked_sums("mse/chosen", model_err, desirable), **masked_sums("mse/rejected", model_err, ~desirable)}
    return loss, metrics


def kto_reference_point(model_err: torch.Tensor, ref_err: torch.Tensor, reduce=None) -> torch.Tensor:
    """Diffusion-KTO's z: the mean implicit reward ``e_ref - e_θ`` of the batch, averaged over processes by
    ``reduce`` (e.g. ``lambda t: accelerator.reduce(t, "mean")``), clamped at 0, detached (the official code)."""
    z = (ref_err.float() - model_err.float()).mean().detach()
    if reduce is not None:
        z = reduce(z)
    return z.clamp(min=0)


# ----------------------------------------------------------------------------------------------------------
# The table of loss types


@dataclass
class LossInputs:
    """What a micro-step hands a loss: the errors of its examples and what some losses read besides them.

    Attributes:
        model_err: ``(2B,)`` policy errors of B pairs, preferred first (``"pairs"`` steps), ``(B,)`` of the preferred
            images (``preferred_only`` losses), or ``(N,)`` of N labeled images (``"images"`` steps).
        ref_err: the reference errors in the same order, or None for a loss without a reference.
        pred, target: the policy's prediction and its target, ``(rows, C, h, w)`` (the SDPO safeguard reads them).
        num_train_timesteps: T of the noise scheduler (MaPO's scale).
        desirable: ``(N,)`` bool labels of labeled images; None for pairs.
        reduce: averages a scalar over every process (KTO's reference point); None: this process alone.
    """

    model_err: torch.Tensor
    ref_err: torch.Tensor | None
    pred: torch.Tensor
    target: torch.Tensor
    num_train_timesteps: int
    desirable: torch.Tensor | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None


def _paired(inputs: LossInputs, loss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sigmoid / ipo / hinge: :func:`diffusion_dpo_loss`, with the SDPO safeguard when ``loss.sdpo_mu`` is set."""
    scale = None if loss.sdpo_mu is None else sdpo_loser_scale(inputs.pred, inputs.target, loss.sdpo_mu)
    per_pair, metrics = diffusion_dpo_loss(inputs.model_err, inputs.ref_err, loss.beta, loss.type,
                                           loss.label_smoothing, scale)
    if scale is not None:
        metrics["sdpo/loser_scale"] = scale.expand(per_pair.shape[0])
    return per_pair, metrics


def _mapo(inputs: LossInputs, loss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return mapo_loss(inputs.model_err, loss.mapo_beta, loss.mapo_alpha, inputs.num_train_timesteps)


def _kto(inputs: LossInputs, loss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    z = kto_reference_point(inputs.model_err, inputs.ref_err, reduce=inputs.reduce)
    return kto_loss(inputs.model_err, inputs.ref_err, inputs.desirable, loss.kto_beta, z, loss.desirable_weight,
                    loss.undesirable_weight)


def _sft(inputs: LossInputs, loss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return sft_loss(inputs.model_err)


@dataclass(frozen=True)
class LossType:
    """One row of :data:`LOSSES`: everything the kit needs to know about a ``loss.type``.

    Attributes:
        method: how the model card names the method (``trained with {method}``).
        step: the micro-step kind that trains it (:mod:`lora_dpo.training.steps`): ``"pairs"`` (a micro-batch of B
            preference pairs, ``train.batch_size`` counts pairs) or ``"images"`` (N labeled images, each its own
            draw, ``train.batch_size`` counts images).
        needs_reference: whether it compares against a reference (a reference pass, or precomputed reference errors).
        hyperparameters: the ``loss.*`` keys it reads, always shown by ``LossConfig.describe`` (``β 5000``).
        options: further ``loss.*`` keys it accepts, off by default, shown when set; a key of :data:`REFUSALS` that a
            type lists in neither tuple is refused for it.
        per_example: ``(LossInputs, loss config) -> (loss per example, metrics)``.
        preferred_only: a ``"pairs"`` loss that runs only the preferred image of each pair through the policy (SFT).
    """

    method: str
    step: str
    needs_reference: bool
    hyperparameters: tuple[str, ...]
    options: tuple[str, ...]
    per_example: Callable[[LossInputs, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    preferred_only: bool = False

    @property
    def unit(self) -> str:
        """What ``train.batch_size`` and the throughput count: ``"pairs"`` or ``"images"`` (labeled images)."""
        return "images" if self.step == "images" else "pairs"


_ANCHOR = ("sft_weight",)  # the SFT anchor w·e_θ(w), added to any preference loss by its micro-step

LOSSES: dict[str, LossType] = {
    "sigmoid": LossType("Diffusion-DPO (Wallace et al., CVPR 2024)", "pairs", True, ("beta",),
                        ("label_smoothing", "sdpo_mu", *_ANCHOR), _paired),
    "ipo": LossType("the IPO loss (Azar et al. 2023) on Diffusion-DPO's implicit reward", "pairs", True, ("beta",),
                    _ANCHOR, _paired),
    "hinge": LossType("the hinge loss (Liu et al. 2023) on Diffusion-DPO's implicit reward", "pairs", True, ("beta",),
                      _ANCHOR, _paired),
    "mapo": LossType("MaPO (Hong et al. 2024)", "pairs", False, ("mapo_beta", "mapo_alpha"), _ANCHOR, _mapo),
    "kto": LossType("Diffusion-KTO (Li et al. 2024)", "images", True,
                    ("kto_beta", "desirable_weight", "undesirable_weight"), _ANCHOR, _kto),
    "sft": LossType("supervised fine-tuning on the preferred images", "pairs", False, (), (), _sft,
                    preferred_only=True),
}

# How ``LossConfig.describe`` shows each key: ``{label} {value:g}``.
LABELS = {"beta": "β", "mapo_beta": "β", "mapo_alpha": "α", "kto_beta": "β", "desirable_weight": "λ_D",
          "undesirable_weight": "λ_U", "label_smoothing": "label smoothing", "sdpo_mu": "SDPO μ",
          "sft_weight": "SFT anchor"}

# The keys refused, with these messages (``{type}``: the recipe's loss.type), when set to other than their default
# for a type that does not accept them; checked in this order. A key not listed here (``beta``, ``mapo_*``) is
# ignored by the types that do not read it.
REFUSALS = {
    "label_smoothing": "loss.label_smoothing applies to loss.type=sigmoid (conservative DPO), not {type}",
    "sdpo_mu": "loss.sdpo_mu (the Diffusion-SDPO safeguard) applies to loss.type=sigmoid, not {type}",
    "kto_beta": "loss.kto_beta applies to loss.type=kto (Diffusion-KTO), not {type}",
    "desirable_weight": "loss.desirable_weight applies to loss.type=kto (Diffusion-KTO), not {type}",
    "undesirable_weight": "loss.undesirable_weight applies to loss.type=kto (Diffusion-KTO), not {type}",
    "sft_weight": "loss.sft_weight adds an SFT anchor to a preference loss; loss.type={type} is SFT already",
}


def refused_option(loss_type: str, is_set: Callable[[str], bool]) -> str | None:
    """The message for the first key of :data:`REFUSALS` that ``loss_type`` does not accept but the recipe sets
    (``is_set(key)``: the value differs from its default); None when every set key fits."""
    row = LOSSES[loss_type]
    for key, message in REFUSALS.items():
        if key not in row.hyperparameters and key not in row.options and is_set(key):
            return message.format(type=loss_type)
    return None


def describe(loss_type: str, value: Callable[[str], Any], is_set: Callable[[str], bool]) -> str:
    """``loss_type`` and the hyperparameters it uses, e.g. ``sigmoid (β 5000, SDPO μ 0.6)``, ``mapo (β 0.1, α 0.5)``;
    ``value(key)`` reads a ``loss.*`` key, ``is_set(key)`` says whether an option is on."""
    row = LOSSES[loss_type]
    parts = [f"{LABELS[k]} {value(k):g}" for k in row.hyperparameters]
    parts += [f"{LABELS[k]} {value(k):g}" for k in row.options if is_set(k)]
    return f"{loss_type} ({', '.join(parts)})" if parts else loss_type
