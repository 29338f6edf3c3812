"""Diagnostics of a preference run, logged with its metrics: margins by timestep, and both errors rising.

- **Margins by timestep bucket** (``rewards/margins_t0-249`` ... for T = 1000 and 4 buckets): the mean implicit
  reward margin of the pairs whose shared timestep fell in each quarter of ``[0, T)``. Diffusion-DPO averages over t;
  a margin that grows only at large t (coarse layout) or only at small t (fine detail) shows here.
- **Both errors rising**: ``rewards/chosen = -0.5·β·(e_θ(w) - e_ref(w))`` below 0 means the policy denoises the
  preferred images worse than the reference does. When that holds for the preferred and the rejected images over a
  window of steps, the margin is being widened by degrading both, the failure Diffusion-SDPO (Fu et al. 2025,
  arXiv 2511.03317) describes and guards against (``loss.sdpo_mu``). :class:`BothErrorsRising` warns once. Under
  Diffusion-KTO the same holds for its desirable and undesirable images (``rewards/chosen`` and ``rewards/rejected``
  in TRL's KTO names).
- **Means over some examples** (:func:`lora_dpo.losses.masked_sums`, :func:`ratio_means`): a per-step mean over part
  of the batch (a timestep bucket, KTO's images of one label) travels as a sum and a count, so it adds up over
  micro-batches and processes before one division.
"""

from __future__ import annotations

from collections import deque

import torch

from lora_dpo.losses import COUNT, SUM, masked_sums

BUCKETS = 4


def ratio_means(totals: dict[str, float]) -> dict[str, float]:
    """``totals`` with each ``name:sum`` / ``name:count`` pair of :func:`lora_dpo.losses.masked_sums` replaced by
    ``name`` = sum / count (left out when no example counted). Any common scale of the two (the loop's division by the example count)
    cancels."""
    out = {k: v for k, v in totals.items() if not k.endswith((SUM, COUNT))}
    for key, total in totals.items():
        if key.endswith(SUM):
            name = key[: -len(SUM)]
            count = totals.get(name + COUNT, 0.0)
            if count:
                out[name] = total / count
    return out


def step_means(sums: dict[str, torch.Tensor], examples: int, accelerator) -> tuple[dict[str, float], float]:
    """A step's metrics as means over every example (pair, or image) of the step, across processes, and the number
    of examples; the means over some of them (sums and counts, :func:`lora_dpo.losses.masked_sums`) as their ratios.

    Args:
        sums: each metric summed over this process's examples of the step (0-dim tensors). Every process must hold
            the same names in the same order (KTO's label-wise sums are always there).
        examples: this process's examples.
        accelerator: reduces the sums across processes (``reduce(t, "sum")``).
    Returns:
        ``(means, total examples)``; under KTO (no ``rewards/margins`` of its own) the margin is
        ``rewards/chosen - rewards/rejected``.
    """
    counted = torch.tensor(float(examples), device=accelerator.device)
    totals = accelerator.reduce(torch.stack([*sums.values(), counted]), "sum")
    final = ratio_means({name: (totals[i] / totals[-1]).item() for i, name in enumerate(sums)})
    if "rewards/margins" not in final and {"rewards/chosen", "rewards/rejected"} <= set(final):  # KTO
        final["rewards/margins"] = final["rewards/chosen"] - final["rewards/rejected"]
    return final, totals[-1].item()


def timestep_bucket_sums(margins: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int,
                         buckets: int = BUCKETS) -> dict[str, torch.Tensor]:
    """The margins of one micro-batch by timestep bucket, as :func:`masked_sums` (``rewards/margins_t0-249:sum`` and
    ``:count``, ...) to add up over a step and across processes; :func:`ratio_means` gives the bucket means.

    Args:
        margins: ``(B,)`` ``rewards/margins``. timesteps: ``(B,)`` the pairs' timesteps, in ``[0, T)``.
    """
    width = num_train_timesteps // buckets
    index = (timesteps.long() * buckets // num_train_timesteps).clamp(0, buckets - 1)
    out = {}
    for k in range(buckets):
        hi = num_train_timesteps - 1 if k == buckets - 1 else (k + 1) * width - 1
        out.update(masked_sums(f"rewards/margins_t{k * width}-{hi}", margins, index == k))
    return out


class BothErrorsRising:
    """Watches ``rewards/chosen`` and ``rewards/rejected`` over the last ``window`` steps; :meth:`update` returns a
    warning the first time both window means are below 0 (the preferred and the rejected images both denoised worse
    than by the reference), then None. ``flag`` is 1.0 while that holds (logged as ``diagnostics/both_errors_rising``).
    ``unpaired=True`` words it for Diffusion-KTO (desirable and undesirable images; no SDPO safeguard to suggest).
    """

    def __init__(self, window: int = 20, unpaired: bool = False):
        self.chosen: deque[float] = deque(maxlen=window)
        self.rejected: deque[float] = deque(maxlen=window)
        self.unpaired = unpaired
        self.warned = False
        self.flag = 0.0

    def update(self, metrics: dict[str, float]) -> str | None:
        if "rewards/chosen" not in metrics or "rewards/rejected" not in metrics:  # KTO: a step without one label
            return None
        self.chosen.append(metrics["rewards/chosen"])
        self.rejected.append(metrics["rewards/rejected"])
        full = len(self.chosen) == self.chosen.maxlen
        chosen, rejected = sum(self.chosen) / len(self.chosen), sum(self.rejected) / len(self.rejected)
        self.flag = float(full and chosen < 0 and rejected < 0)
        if not self.flag or self.warned:
            return None
        self.warned = True
        good, bad = ("desirable", "undesirable") if self.unpaired else ("preferred", "rejected")
        remedies = ("an SFT anchor on the desirable images (loss.sft_weight), or a lower optim.lr" if self.unpaired else
                    "the Diffusion-SDPO safeguard (loss.sdpo_mu=0.6 for SDXL, 0.9 for SD1.5), an SFT anchor "
                    "(loss.sft_weight), or a lower optim.lr")
        return (f"over the last {len(self.chosen)} steps the policy's error rose above the reference's on the {good} "
                f"images (mean rewards/chosen {chosen:.4g}) as well as on the {bad} ones (rewards/rejected "
                f"{rejected:.4g}): the gap is widening by degrading both. Consider {remedies}")
