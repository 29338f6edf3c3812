"""Pairing scored candidates (issue 18): which pairs each rule makes, their orientation, what is skipped, the two
ways of combining several scorers; and the implicit-reward accuracy's standard error over draws."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lora_dpo.evaluation.implicit_reward import draw_standard_error
from lora_dpo.feedback.pairing import PAIRINGS, majority, mean_rank, pair_candidates
from lora_dpo.feedback.prefs import labels_from_scores


def _random_scores(groups=50, n=8, seed=0):
    return np.random.default_rng(seed).normal(size=(groups, n))


def test_best_worst_pairs_the_highest_with_the_lowest():
    scores = _random_scores()
    pairs = pair_candidates(scores, "best-worst")
    assert pairs.group.tolist() == list(range(50)) and not pairs.skipped
    assert (pairs.preferred == scores.argmax(1)).all() and (pairs.rejected == scores.argmin(1)).all()
    assert np.array_equal(pairs.gap, scores.max(1) - scores.min(1))


def test_adjacent_is_the_two_seed_labelling():
    """N = 2m candidates give m pairs (2j, 2j + 1) per group, oriented as labels_from_scores labels them."""
    scores = _random_scores(groups=20, n=6, seed=1)
    scores[3, 2] = scores[3, 3]  # one tie
    pairs = pair_candidates(scores, "adjacent")
    assert pairs.skipped == {"tie": 1} and len(pairs.group) == 20 * 3 - 1
    first = np.minimum(pairs.preferred, pairs.rejected)
    assert (first % 2 == 0).all() and (np.abs(pairs.preferred - pairs.rejected) == 1).all()
    labels = labels_from_scores(scores[:, 0::2].ravel(), scores[:, 1::2].ravel()).reshape(20, 3)
    kept = labels[pairs.group, first // 2]
    assert ((kept == 1.0) == (pairs.preferred == first)).all()  # label_0 = 1: the even seed is preferred
    assert (labels == 0.5).sum() == 1


def test_top_bottom_k_pairs_the_k_best_with_the_k_worst():
    scores = _random_scores(groups=30, n=8, seed=2)
    pairs = pair_candidates(scores, "top-bottom-k", k=3)
    assert len(pairs.group) == 30 * 3 and np.array_equal(pairs.group, np.repeat(np.arange(30), 3))
    for g in range(30):
        mine = pairs.group == g
        order = np.argsort(-scores[g])
        assert pairs.preferred[mine].tolist() == order[:3].tolist()
        assert pairs.rejected[mine].tolist() == order[::-1][:3].tolist()
    # every preferred image outscores every rejected image of its group
    for g in range(30):
        mine = pairs.group == g
        assert scores[g, pairs.preferred[mine]].min() > scores[g, pairs.rejected[mine]].max()


@pytest.mark.parametrize("min_gap", [0.0, 0.5, 1.5])
def test_all_makes_every_pair_with_a_large_enough_gap(min_gap):
    scores = np.round(_random_scores(groups=10, n=5, seed=3), 1)  # rounding makes some exact ties
    pairs = pair_candidates(scores, "all", min_gap=min_gap)
    expected = [(g, a, b) for g in range(10) for a, b in itertools.combinations(range(5), 2)
                if scores[g, a] != scores[g, b] and abs(scores[g, a] - scores[g, b]) >= min_gap]
    assert len(pairs.group) == len(expected) and sum(pairs.skipped.values()) == 10 * 10 - len(expected)
    assert (scores[pairs.group, pairs.preferred] > scores[pairs.group, pairs.rejected]).all()
    assert np.allclose(pairs.gap, scores[pairs.group, pairs.preferred] - scores[pairs.group, pairs.rejected])
    assert (pairs.gap >= min_gap).all()


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_ties_and_degenerate_groups_are_skipped_and_counted(pairing):
    scores = np.array([[1.0, 1.0, 1.0, 1.0],   # degenerate: no pair, counted once
                       [2.0, 2.0, 1.0, 1.0],   # adjacent: two ties
                       [4.0, 3.0, 2.0, 1.0]])
    pairs = pair_candidates(scores, pairing, k=2)
    assert pairs.skipped["degenerate_group"] == 1 and 0 not in pairs.group
    assert (scores[pairs.group, pairs.preferred] > scores[pairs.group, pairs.rejected]).all()
    made = {"adjacent": 2, "best-worst": 2, "top-bottom-k": 4, "all": 4 + 6}[pairing]
    ties = {"adjacent": 2, "best-worst": 0, "top-bottom-k": 0, "all": 2}[pairing]
    assert len(pairs.group) == made and pairs.skipped["tie"] == ties


def test_mean_rank_is_the_average_rank_and_ignores_each_scorer_s_scale():
    assert mean_rank([[[3.0, 1.0, 2.0]]]).tolist() == [[2.0, 0.0, 1.0]]
    assert mean_rank([[[1.0, 1.0, 0.0]]]).tolist() == [[1.5, 1.5, 0.0]]  # a tie shares its mean rank
    a, b = _random_scores(groups=4, n=6, seed=4), _random_scores(groups=4, n=6, seed=5)
    combined = mean_rank(np.stack([a, b]))
    assert np.array_equal(combined, mean_rank(np.stack([1000 * a + 7, np.exp(b)])))  # ranks, not values
    assert np.array_equal(mean_rank(a[None]), np.argsort(np.argsort(a, 1), 1).astype(float))


def test_majority_counts_pairwise_wins_by_most_scorers():
    # three scorers on candidates 0, 1, 2 of one group: 0 over 1 (scorers 1, 2 of 3), 0 over 2 (2 of 3), and 2 over 1
    # (scorers 2 and 3 against scorer 1): 0 wins twice, 2 once, 1 never
    scores = np.array([[[3.0, 2.0, 1.0]], [[3.0, 1.0, 2.0]], [[1.0, 2.0, 3.0]]])
    wins = majority(scores)
    assert wins.tolist() == [[2.0, 0.0, 1.0]]
    assert np.allclose(mean_rank(scores), [[4 / 3, 2 / 3, 1.0]])  # ranks (2, 1, 0), (2, 0, 1), (0, 1, 2)
    pairs = pair_candidates(wins, "best-worst")
    assert (pairs.preferred[0], pairs.rejected[0]) == (0, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scores=[[1.0, 2.0]], pairing="random"), "pairing must be one of"),
    (dict(scores=[1.0, 2.0], pairing="all"), "at least 2 candidates"),
    (dict(scores=[[1.0, float("nan")]], pairing="all"), "finite"),
    (dict(scores=[[1.0, 2.0, 3.0, 4.0]], pairing="top-bottom-k", k=3), "k <= candidates / 2 = 2"),
    (dict(scores=[[1.0, 2.0, 3.0]], pairing="adjacent"), "even number"),
    (dict(scores=[[1.0, 2.0]], pairing="all", min_gap=-1.0), "min_gap"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pair_candidates(**kwargs)


def test_the_implicit_reward_accuracy_s_draw_error():
    """The bootstrap standard error over draws: 0 when every draw of every pair agrees in sign; for pairs whose
    margins straddle 0 it falls as draws are added."""
    rng = np.random.default_rng(0)
    assert draw_standard_error(np.abs(rng.normal(size=(100, 4))) + 0.1) == 0.0
    mu = rng.normal(scale=0.3, size=(400, 1))  # per-pair true margins near 0, draw noise of 1
    few, many = draw_standard_error(mu + rng.normal(size=(400, 4))), draw_standard_error(mu + rng.normal(size=(400, 64)))
    assert 0 < many < few < 0.5
    with pytest.raises(ValueError, match="pairs, draws"):
        draw_standard_error(np.zeros(5))
