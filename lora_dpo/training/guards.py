"""What keeps a bad step out of the weights and a bad state out of the checkpoints.

- :class:`NonFiniteGrads`: a step whose gradient norm is NaN/Inf is skipped (no optimizer step: the weights stay
  as they were, as mixed precision's loss scaler does on an overflow); ``train.stop_after_nonfinite_grads`` of
  them in a row stop the run.
- :func:`all_finite`: a checkpoint is written only from finite trainable weights.
- :class:`WeightsMoved`: whether the trainable weights changed at all since the run (or its resume) began; a run
  that never moved them says so (warning, ``diagnostics/weights_moved`` in the final metrics, the model card).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Every element of every floating-point tensor is finite (integer tensors always are)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def grad_norm_value(grad_norm: torch.Tensor | float | None) -> float | None:
    """The gradient norm as a float (None when the backend clips on its own and returns none: DeepSpeed)."""
    return None if grad_norm is None else float(grad_norm)


class NonFiniteGrads:
    """Counts optimizer steps in a row whose gradient norm was NaN or Inf.

    ``update(norm)`` returns True when the step must be skipped; :attr:`exhausted` is True once ``limit`` steps in
    a row were. A finite norm resets the count. ``in_row`` restores the count of a resumed run."""

    def __init__(self, limit: int, in_row: int = 0):
        self.limit, self.in_row = limit, in_row

    def update(self, grad_norm: float | None) -> bool:
        if grad_norm is None or math.isfinite(grad_norm):
            self.in_row = 0
            return False
        self.in_row += 1
        return True

    @property
    def exhausted(self) -> bool:
        return self.in_row >= self.limit


class WeightsMoved:
    """Whether the trainable parameters changed since construction: a fingerprint (the float64 sum and sum of
    squares of each parameter, one pass over them) is compared, exactly. ``moved_before``: a resumed run's earlier
    answer (from its checkpoint), OR-ed in."""

    def __init__(self, params: list[torch.nn.Parameter], moved_before: bool = False):
        self.params, self.moved_before = params, moved_before
        self.start = self._fingerprint()

    def _fingerprint(self) -> torch.Tensor:
        with torch.no_grad():
            if not self.params:
                return torch.zeros(0, dtype=torch.float64)
            return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in self.params])

    def moved(self) -> bool:
        """True when any trainable parameter differs from the start (on this process; reduce across processes)."""
        return self.moved_before or not torch.equal(self._fingerprint(), self.start)
