"""Preference pairs from AI feedback: sample two images per (prompt, pair), let a scorer pick the preferred one.

This is the "learning from AI feedback" setting of Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, §5.3):
the preference labels come from a reward model instead of people. The output is a Pick-a-Pic-schema parquet that
:func:`lora_dpo.data.sources.load_preference_dataset` reads directly.

Seeds: pair k (k = 0 .. pairs_per_prompt-1) of EVERY prompt uses ``seed_0 = seed_offset + 2k`` and
``seed_1 = seed_offset + 2k + 1``, so one set uses the seed range ``[seed_offset, seed_offset + 2·pairs_per_prompt)``.
For a training set and a held-out set with disjoint noise, give the held-out set
``seed_offset >= train_offset + 2·train_pairs_per_prompt`` (e.g. train at 0, held-out at 1_000_000).

With ``candidates`` (:func:`build_candidate_set`, ``lora-dpo prefs --candidates N``) each prompt gets groups of N
images (group j from the seeds ``[seed_offset + jN, seed_offset + (j+1)N)``), and a pairing rule
(:mod:`lora_dpo.feedback.pairing`: best against worst, ...) picks the pairs within each group.

Relabelling a real preference set with a scorer (``lora-dpo prefs --relabel``) is in :mod:`lora_dpo.feedback.relabel`.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lora_dpo.feedback.pairing import Pairs, majority, mean_rank, pair_candidates
from lora_dpo.feedback.scorers import Scorer
from lora_dpo.inference.sampling import generate_images, load_pipeline


def pair_seeds(k: int, seed_offset: int = 0) -> tuple[int, int]:
    """The seeds of pair ``k``: ``(seed_offset + 2k, seed_offset + 2k + 1)``."""
    return seed_offset + 2 * k, seed_offset + 2 * k + 1


def png_bytes(img: Image.Image) -> bytes:
    """``img`` encoded as PNG (lossless)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def labels_from_scores(score_0: np.ndarray, score_1: np.ndarray, tie_margin: float = 0.0) -> np.ndarray:
    """``label_0`` from two rewards: 1.0 where ``score_0 > score_1 + tie_margin``, 0.0 where
    ``score_1 > score_0 + tie_margin``, else 0.5 (a tie: ``|score_0 - score_1| <= tie_margin``)."""
    diff = np.asarray(score_0, dtype=np.float64) - np.asarray(score_1, dtype=np.float64)
    return np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))


@contextmanager
def atomic_path(out_path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out_path`` (parent folders created); on success it is moved onto
    ``out_path``, on failure removed."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def build_preference_set(pipeline_dir, scorer: Scorer, prompts: list[str], pairs_per_prompt: int,
                         out_path: str | Path, *, seed_offset: int = 0, num_inference_steps: int = 20,
                         guidance_scale: float = 3.0, batch_size: int = 64) -> dict[str, Any]:
    """Generate ``len(prompts) × pairs_per_prompt`` image pairs, score them, write a Pick-a-Pic parquet.

    Wallace et al. 2023 §5.3 (learning from AI feedback). For each prompt and pair index k the two images are
    generated with seeds :func:`pair_seeds` ``(k, seed_offset)`` (see the module docstring for disjoint
    train / held-out seed ranges) and scored by ``scorer``.

    Args:
        pipeline_dir: a diffusers SD1.5 / SDXL pipeline folder (or hub id), or an already loaded pipeline.
        scorer: any :class:`lora_dpo.feedback.scorers.Scorer` (higher = better).
        prompts: captions; rows are written prompt by prompt, pair by pair.
        pairs_per_prompt: pairs per prompt (each pair uses two seeds).
        out_path: the parquet file; written to a temporary file beside it, then moved into place (atomic).
        num_inference_steps, guidance_scale, batch_size: see :func:`lora_dpo.inference.sampling.generate_images`.

    The parquet's columns: ``caption`` (string), ``jpg_0``, ``jpg_1`` (PNG bytes: lossless; the names stay
    Pick-a-Pic's), ``label_0`` (1.0 when ``score_0 > score_1``, 0.0 when lower, 0.5 when equal: a tie, which
    training drops), ``score_0``, ``score_1`` (float64), ``seed_0``, ``seed_1`` (int64).

    Returns:
        report: ``pairs``, ``ties``, ``label_0_counts`` ({"1.0", "0.0", "0.5"}: rows), ``mean_score`` (over all
        images), ``mean_abs_margin`` (mean |score_0 - score_1|), ``per_prompt`` ({prompt: {"pairs", "ties",
        "mean_score"}}), ``scorer``, ``seed_offset``, ``seed_range`` ([first, last + 1)), ``out``.

    Raises:
        ValueError: no prompts, ``pairs_per_prompt`` < 1 or ``seed_offset`` < 0.
        lora_dpo.models.loading.ModelLoadError: ``pipeline_dir`` is not a pipeline folder / supported pipeline.
    """
    _check_sampling(prompts, "pairs_per_prompt", pairs_per_prompt, 1, seed_offset)
    _check_scorer(scorer, prompts)
    pipe = load_pipeline(pipeline_dir) if isinstance(pipeline_dir, (str, os.PathLike)) else pipeline_dir
    captions = [p for p in prompts for _ in range(pairs_per_prompt)]
    seeds = np.array([pair_seeds(k, seed_offset) for _ in prompts for k in range(pairs_per_prompt)], dtype=np.int64)
    # Images interleaved: pair i is images (2i, 2i + 1).
    all_prompts = [c for c in captions for _ in range(2)]
    images = generate_images(pipe, all_prompts, seeds.reshape(-1).tolist(), num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, batch_size=batch_size)
    scores = np.asarray(scorer.score(images, all_prompts), dtype=np.float64).reshape(-1, 2)
    labels = labels_from_scores(scores[:, 0], scores[:, 1])
    table = pa.table({
        "caption": pa.array(captions, pa.string()),
        "jpg_0": pa.array([png_bytes(img) for img in images[0::2]], pa.binary()),
        "jpg_1": pa.array([png_bytes(img) for img in images[1::2]], pa.binary()),
        "label_0": pa.array(labels, pa.float64()),
        "score_0": pa.array(scores[:, 0]), "score_1": pa.array(scores[:, 1]),
        "seed_0": pa.array(seeds[:, 0]), "seed_1": pa.array(seeds[:, 1]),
    })
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return {
        **_label_stats(captions, labels, scores),
        "scorer": getattr(scorer, "name", type(scorer).__name__), "seed_offset": seed_offset,
        "seed_range": [seed_offset, seed_offset + 2 * pairs_per_prompt], "out": str(out_path),
    }


def _check_sampling(prompts: list[str], name: str, count: int, least: int, seed_offset: int) -> None:
    """Raise ValueError, before anything loads, for no prompts, ``count`` (the argument ``name``) below ``least``, or
    a negative ``seed_offset``."""
    if not prompts:
        raise ValueError("no prompts given")
    if count < least:
        raise ValueError(f"{name} must be >= {least}, got {count}")
    if seed_offset < 0:
        raise ValueError(f"seed_offset must be >= 0, got {seed_offset}")


def _check_scorer(scorer: Scorer, prompts: list[str]) -> None:
    """Fail fast, before any sampling, on prompts ``scorer`` cannot score (e.g. no digit for the classifier)."""
    unique = list(dict.fromkeys(prompts))
    scorer.score([Image.new("RGB", (32, 32))] * len(unique), unique)


VOTES = {"mean-rank": mean_rank, "majority": majority}


def build_candidate_set(pipeline_dir, scorer: Scorer | list[Scorer], prompts: list[str], candidates: int,
                        out_path: str | Path, *, pairing: str = "best-worst", k: int = 1, min_gap: float = 0.0,
                        vote: str = "mean-rank", seed_offset: int = 0, groups_per_prompt: int = 1,
                        num_inference_steps: int = 20, guidance_scale: float = 3.0, batch_size: int = 64,
                        resolution: int | None = None,
                        on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Sample ``candidates`` images per prompt and group, score them, pair them by ``pairing``, write a Pick-a-Pic
    parquet.

    Each prompt gets ``groups_per_prompt`` groups of N = ``candidates`` images; candidate i of group j of every prompt
    uses the seed ``seed_offset + j·N + i`` (one set spans the seeds ``[seed_offset, seed_offset + groups·N)``). The
    scored candidates of a group form one group of :func:`lora_dpo.feedback.pairing.pair_candidates` (``best-worst``: the highest against the lowest score, as online
    DPO pairs them; ``top-bottom-k``, ``all`` with ``min_gap``, ``adjacent``). Each row is one pair, preferred first:
    ``caption``, ``jpg_0`` (preferred) and ``jpg_1`` (rejected) as PNG bytes, ``label_0`` = 1.0, ``score_0``,
    ``score_1``, ``seed_0``, ``seed_1``, and ``candidates`` (N). Pairs with equal scores and prompts whose N scores are
    all equal give no row; they are counted in the report's ``skipped``.

    Args:
        pipeline_dir: a diffusers pipeline folder (or hub id), or an already loaded pipeline.
        scorer: any :class:`lora_dpo.feedback.scorers.Scorer` (higher = better), or several: their verdicts are
            combined per prompt by ``vote`` (:data:`VOTES`: ``mean-rank``, the mean of each candidate's rank under
            each scorer; ``majority``, its pairwise wins by most scorers), and the rows' ``score_0`` / ``score_1``
            hold the combined values.
        prompts: captions; each gets ``groups_per_prompt`` groups of candidates (rows are written group by group,
            prompt-major).
        candidates: N >= 2 images per group.
        groups_per_prompt: groups of N per prompt (>= 1): with ``best-worst``, the pairs per prompt.
        out_path: the parquet file, written atomically.
        num_inference_steps, guidance_scale, batch_size, on_batch: see
            :func:`lora_dpo.inference.sampling.generate_images`.
        resolution: the images' side in pixels (None: the pipeline's default).
    Returns:
        report: ``pairs``, ``prompts``, ``groups_per_prompt``, ``candidates``, ``pairing``, ``skipped`` ({reason:
        count}), ``mean_score`` (all candidates), ``mean_gap`` (preferred − rejected), ``mean_best_minus_mean`` (per group: the best
        candidate's score minus the group's mean, averaged), ``scorer`` (names joined by ``+``; with several also
        ``vote`` and ``mean_score_by_scorer``), ``seed_offset``, ``seed_range``, ``out``.
    Raises:
        ValueError: no prompts; ``candidates`` < 2; ``groups_per_prompt`` < 1; ``seed_offset`` < 0; a bad pairing, k
            or vote (checked before sampling).
    """
    scorers = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer]
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {', '.join(VOTES)}, not {vote!r}")
    _check_sampling(prompts, "candidates", candidates, 2, seed_offset)
    if groups_per_prompt < 1:
        raise ValueError(f"groups_per_prompt must be >= 1, got {groups_per_prompt}")
    pair_candidates(np.arange(candidates, dtype=np.float64)[None], pairing, k=k, min_gap=0.0)  # bad rules fail now
    for each in scorers:
        _check_scorer(each, prompts)
    pipe = load_pipeline(pipeline_dir) if isinstance(pipeline_dir, (str, os.PathLike)) else pipeline_dir
    group_prompts = [p for p in prompts for _ in range(groups_per_prompt)]  # group g: prompt g // groups_per_prompt
    seeds = np.array([[seed_offset + j * candidates + i for i in range(candidates)]
                      for _ in prompts for j in range(groups_per_prompt)], dtype=np.int64)  # (G, N)
    all_prompts = [p for p in group_prompts for _ in range(candidates)]
    images = generate_images(pipe, all_prompts, seeds.ravel().tolist(), num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, height=resolution, width=resolution,
                             batch_size=batch_size, on_batch=on_batch)
    each = np.stack([np.asarray(s.score(images, all_prompts), dtype=np.float64).reshape(len(group_prompts), candidates)
                     for s in scorers])  # (S, G, N)
    scores = each[0] if len(scorers) == 1 else VOTES[vote](each)
    pairs = pair_candidates(scores, pairing, k=k, min_gap=min_gap)
    table = _pairs_table(pairs, group_prompts, images, scores, seeds)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return {
        "pairs": len(pairs.group), "prompts": len(prompts), "groups_per_prompt": groups_per_prompt, "candidates": candidates,
        "pairing": pairing,
        "skipped": dict(pairs.skipped), "mean_score": float(scores.mean()),
        "mean_gap": float(pairs.gap.mean()) if len(pairs.group) else None,
        "mean_best_minus_mean": float((scores.max(1) - scores.mean(1)).mean()),
        "scorer": "+".join(getattr(s, "name", type(s).__name__) for s in scorers),
        **({"vote": vote, "mean_score_by_scorer": {getattr(s, "name", type(s).__name__): float(e.mean())
                                                   for s, e in zip(scorers, each)}} if len(scorers) > 1 else {}),
        "seed_offset": seed_offset, "seed_range": [seed_offset, seed_offset + groups_per_prompt * candidates],
        "out": str(out_path),
    }


def _pairs_table(pairs: Pairs, group_prompts: list[str], images: list[Image.Image], scores: np.ndarray,
                 seeds: np.ndarray) -> pa.Table:
    """:func:`build_candidate_set`'s rows, one per pair, preferred first: the groups' captions, the images (flat,
    group-major) as PNG, the scores and seeds ``(G, N)`` of both candidates."""
    candidates = scores.shape[1]
    win = pairs.group * candidates + pairs.preferred  # index into the flat images
    lose = pairs.group * candidates + pairs.rejected
    return pa.table({
        "caption": pa.array([group_prompts[g] for g in pairs.group], pa.string()),
        "jpg_0": pa.array([png_bytes(images[i]) for i in win], pa.binary()),
        "jpg_1": pa.array([png_bytes(images[i]) for i in lose], pa.binary()),
        "label_0": pa.array(np.ones(len(win)), pa.float64()),
        "score_0": pa.array(scores.ravel()[win]), "score_1": pa.array(scores.ravel()[lose]),
        "seed_0": pa.array(seeds.ravel()[win]), "seed_1": pa.array(seeds.ravel()[lose]),
        "candidates": pa.array(np.full(len(win), candidates, dtype=np.int64)),
    })


def _label_stats(captions: list[str], labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """:func:`build_preference_set`'s report fields from ``pairs`` to ``per_prompt``, for the pairs' ``captions``,
    ``labels`` ``(R,)`` and ``scores`` ``(R, 2)``."""
    per_prompt: dict[str, dict[str, Any]] = defaultdict(lambda: {"pairs": 0, "ties": 0, "score_sum": 0.0})
    for caption, label, pair in zip(captions, labels, scores):
        entry = per_prompt[caption]
        entry["pairs"] += 1
        entry["ties"] += int(label == 0.5)
        entry["score_sum"] += float(pair.sum())
    return {
        "pairs": len(captions), "ties": int((labels == 0.5).sum()),
        "label_0_counts": {str(v): int((labels == v).sum()) for v in (1.0, 0.0, 0.5)},
        "mean_score": float(scores.mean()), "mean_abs_margin": float(np.abs(scores[:, 0] - scores[:, 1]).mean()),
        "per_prompt": {p: {"pairs": e["pairs"], "ties": e["ties"], "mean_score": e["score_sum"] / (2 * e["pairs"])}
                       for p, e in per_prompt.items()},
    }
