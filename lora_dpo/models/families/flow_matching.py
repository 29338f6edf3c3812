"""What the rectified-flow families (SD3 / SD3.5, FLUX.1) share: drawing σ, shifting it, noising, the velocity target.

Rectified flow (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", ICML 2024,
arXiv 2403.03206, Eq. 1 and Sec. 3.1): ``x_t = (1 − σ)·x_0 + σ·ε`` with ``σ ∈ (0, 1]``, and the transformer predicts
the velocity ``v = ε − x_0``. Flow-DPO draws one σ and one ε per pair, shared by both images, as Diffusion-DPO draws
one t (Wallace et al. 2023, arXiv 2311.12908, Eq. 14).

σ densities, by the names diffusers' SD3 / FLUX training scripts use (``--weighting_scheme``): ``logit_normal``
(``σ = sigmoid(u)``, ``u ~ N(mean, std)``: SD3 paper Eq. 19, mean 0, std 1 by default), ``mode`` (Eq. 20, scale
1.29 as there) and ``uniform``. The scheduler's shift is then applied to the drawn σ, continuously:

- a static ``shift`` s (``FlowMatchEulerDiscreteScheduler`` without dynamic shifting: SD3 uses 3.0):
  ``σ' = s·σ / (1 + (s − 1)·σ)`` (SD3 paper Eq. 23 with ``s = sqrt(m/n)``), the map the scheduler applies to its own
  sampling table;
- dynamic shifting (FLUX.1: ``use_dynamic_shifting``): ``σ' = e^μ / (e^μ + 1/σ − 1)``, with ``μ`` linear in the
  image's token count between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``, as the
  FLUX pipeline sets it for sampling; training then sees the σ range sampling will use.

Nothing here knows a pipeline: the families' modules call these with their scheduler's config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

SIGMA_SCHEMES = ("logit_normal", "uniform", "mode")


def sample_density(scheme: str, n: int, generator: torch.Generator | None = None, *, logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """``n`` draws ``u ∈ (0, 1)`` (float32, CPU) from the σ density ``scheme`` (:data:`SIGMA_SCHEMES`), one
    ``torch`` call on ``generator`` per draw kind, so a pair's CPU generator gives the same σ on any device.

    ``logit_normal``: ``sigmoid(N(logit_mean, logit_std))``; ``mode``: ``1 − u − s·(cos²(π·u/2) − 1 + u)``,
    ``u ~ U(0, 1)``, ``s = mode_scale``; ``uniform``: ``U(0, 1)``.

    Raises:
        ValueError: an unknown ``scheme`` (the message lists the known ones).
    """
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size=(n,), generator=generator))
    if scheme == "mode":
        u = torch.rand(n, generator=generator)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"σ density '{scheme}' is not one of {', '.join(SIGMA_SCHEMES)}")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The static timestep shift ``s·σ / (1 + (s − 1)·σ)`` (``shift`` = s ≥ 0; 1 leaves σ as it is), elementwise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """FLUX's ``μ`` for an image of ``image_seq_len`` transformer tokens: linear between ``(base_image_seq_len,
    base_shift)`` and ``(max_image_seq_len, max_shift)`` of the scheduler ``config`` (defaults 256, 0.5, 4096,
    1.15, as FLUX.1's scheduler config)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + (base - slope * base_len)


def scheduler_shift(sigmas: torch.Tensor, config: Mapping[str, Any], image_seq_len: int) -> torch.Tensor:
    """``sigmas`` (any shape, in (0, 1]) shifted as the flow scheduler ``config`` shifts its sampling schedule:
    exponentially by :func:`dynamic_shift_mu` under ``use_dynamic_shifting``, else statically by ``shift``.

    Raises:
        NotImplementedError: ``time_shift_type: linear`` dynamic shifting (no released FLUX.1 / SD3 model uses it).
    """
    if config.get("use_dynamic_shifting", False):
        if config.get("time_shift_type", "exponential") != "exponential":
            raise NotImplementedError("only exponential dynamic shifting (FLUX.1's) is supported")
        mu = dynamic_shift_mu(image_seq_len, config)
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return shift_sigmas(sigmas, float(config.get("shift", 1.0)))


def image_seq_len(latent_shape: Sequence[int], patch_size: int = 2) -> int:
    """Transformer tokens of a latent ``(C, h, w)`` cut into ``patch_size``² patches (FLUX packs 2×2)."""
    _, h, w = latent_shape[-3:]
    return (h // patch_size) * (w // patch_size)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def flow_noised(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − σ)·x_0 + σ·ε``: ``latents`` x_0 and ``noise`` ε ``(N, C, h, w)``, ``sigmas`` ``(N,)`` (one per
    sample, broadcast over its elements); computed in the latents' dtype."""
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def flow_velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow training target ``v = ε − x_0`` (``d x_t / d σ``), shaped like ``latents``."""
    return noise - latents
