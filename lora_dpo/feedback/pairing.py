"""Which scored candidates become preference pairs (issue 18): adjacent seeds, best against worst, the k best against
the k worst, or every pair with a large enough score gap.

Sampling N candidates per prompt and pairing the best with the worst is what online preference tuning of diffusion
models does (flow_grpo's online DPO pairs the best and worst of 24 samples per prompt; ADHMR pairs top- against
bottom-scored candidates); ``adjacent`` is the kit's original two-seed pairing (:mod:`lora_dpo.feedback.prefs`).

Everything here is pure index arithmetic on a ``(G, N)`` array of scores (G groups of N candidates, higher is better):
no model, no images. A pair is ``(preferred, rejected)`` candidate indices inside its group; a pair whose two scores
are equal is never made (it would be a tie, which training drops), and is counted instead.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np

PAIRINGS = ("adjacent", "best-worst", "top-bottom-k", "all")


class Pairs(NamedTuple):
    """The pairs of G groups and what was skipped.

    ``group``, ``preferred``, ``rejected``: ``(P,)`` int64, the group of each pair and the candidate indices (within
    the group) of its preferred and rejected image; ``gap``: ``(P,)`` float64, the preferred score minus the rejected
    score (> 0). ``skipped``: reason -> count (``tie``: a would-be pair with equal scores, or a gap under
    ``min_gap``; ``degenerate_group``: a group whose scores are all equal, which gives no pair at all).
    """

    group: np.ndarray
    preferred: np.ndarray
    rejected: np.ndarray
    gap: np.ndarray
    skipped: Counter


def _ranked(row: np.ndarray) -> np.ndarray:
    """Candidate indices from the highest score to the lowest; equal scores keep index order (a stable sort)."""
    return np.argsort(-row, kind="stable")


def _group_pairs(row: np.ndarray, pairing: str, k: int) -> list[tuple[int, int]]:
    """Candidate pairs ``(a, b)`` of one group, unoriented (orientation and gaps come after)."""
    n = len(row)
    if pairing == "adjacent":
        return [(2 * j, 2 * j + 1) for j in range(n // 2)]
    order = _ranked(row)
    if pairing == "best-worst":
        return [(int(order[0]), int(order[-1]))]
    if pairing == "top-bottom-k":
        return [(int(order[i]), int(order[n - 1 - i])) for i in range(k)]
    return [(a, b) for a in range(n) for b in range(a + 1, n)]  # all


def pair_candidates(scores, pairing: str = "best-worst", *, k: int = 1, min_gap: float = 0.0) -> Pairs:
    """Preference pairs from the scores of G groups of N candidates each.

    - ``adjacent``: candidates (2j, 2j + 1), j < N/2: the kit's two-seed pairs, N/2 per group;
    - ``best-worst``: the highest against the lowest score, one pair per group;
    - ``top-bottom-k``: the i-th highest against the i-th lowest, i < k (2k <= N), k pairs per group;
    - ``all``: every two candidates, N(N-1)/2 per group.

    Each pair is oriented preferred (higher score) first. A pair whose gap is 0 or under ``min_gap`` is skipped and
    counted as ``tie``; a group whose N scores are all equal gives no pair and is counted once as
    ``degenerate_group`` (its would-be pairs are not also counted as ties). Equal scores are ranked by candidate
    index, so the result is deterministic.

    Args:
        scores: ``(G, N)`` scores, higher is better (N >= 2; finite).
        pairing: one of :data:`PAIRINGS`.
        k: pairs per group for ``top-bottom-k``.
        min_gap: the smallest score gap a pair may have (>= 0).
    Returns:
        :class:`Pairs`, group by group, in each group in the order above.
    Raises:
        ValueError: an unknown ``pairing``; scores not ``(G, N)`` with N >= 2, or not finite; ``k`` < 1 or 2k > N for
            ``top-bottom-k``; ``min_gap`` < 0; odd N for ``adjacent``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, not {pairing!r}")
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (groups, candidates) with at least 2 candidates, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (a scorer returned NaN or inf)")
    n = scores.shape[1]
    if pairing == "top-bottom-k" and not 1 <= k <= n // 2:
        raise ValueError(f"top-bottom-k needs 1 <= k <= candidates / 2 = {n // 2}, got k={k}")
    if pairing == "adjacent" and n % 2:
        raise ValueError(f"adjacent pairing needs an even number of candidates, got {n}")
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    group, preferred, rejected, gap, skipped = [], [], [], [], Counter()
    for g, row in enumerate(scores):
        if np.all(row == row[0]):
            skipped["degenerate_group"] += 1
            continue
        for a, b in _group_pairs(row, pairing, k):
            d = row[a] - row[b]
            if d == 0 or abs(d) < min_gap:
                skipped["tie"] += 1
                continue
            win, lose = (a, b) if d > 0 else (b, a)
            group.append(g)
            preferred.append(win)
            rejected.append(lose)
            gap.append(abs(d))
    return Pairs(np.asarray(group, dtype=np.int64), np.asarray(preferred, dtype=np.int64),
                 np.asarray(rejected, dtype=np.int64), np.asarray(gap, dtype=np.float64), skipped)


def mean_rank(scores) -> np.ndarray:
    """Several scorers' verdicts on the same candidates as one score per candidate: the mean over scorers of each
    candidate's rank within its group (0 = lowest; equal scores share their mean rank), so scorers on different
    scales weigh the same.

    Args:
        scores: ``(S, G, N)``: S scorers' scores of G groups of N candidates.
    Returns:
        ``(G, N)`` float64 mean ranks, higher is better (feed them to :func:`pair_candidates`).
    Raises:
        ValueError: not a 3-dimensional array.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (scorers, groups, candidates), got shape {scores.shape}")
    # rank = (number of strictly lower scores) + (number of equal scores - 1) / 2: the average rank of a tie block
    lower = (scores[..., None, :] < scores[..., :, None]).sum(-1)
    equal = (scores[..., None, :] == scores[..., :, None]).sum(-1)
    return (lower + (equal - 1) / 2).mean(0)


def majority(scores) -> np.ndarray:
    """Several scorers' verdicts as one score per candidate by majority: each candidate's number of pairwise wins
    within its group, where it beats another candidate if more scorers score it higher than score it lower (a split
    vote is no win for either). A pair of candidates the majority ranks one way is oriented that way by
    :func:`pair_candidates` when the wins order them so.

    Args:
        scores: ``(S, G, N)``: S scorers' scores of G groups of N candidates.
    Returns:
        ``(G, N)`` float64 win counts, higher is better.
    Raises:
        ValueError: not a 3-dimensional array.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (scorers, groups, candidates), got shape {scores.shape}")
    above = (scores[..., :, None] > scores[..., None, :]).sum(0)  # (G, N, N): scorers ranking i over j
    below = (scores[..., :, None] < scores[..., None, :]).sum(0)
    return (above > below).sum(-1).astype(np.float64)
