"""Preference pairs from AI feedback: sample two images per (prompt, pair), let a scorer pick the preferred one.

This is the "learning from AI feedback" setting of Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, §5.3):
the preference labels come from a reward model instead of people. The output is a Pick-a-Pic-schema parquet that
:func:`lora_dpo.data.sources.load_preference_dataset` reads directly.

Seeds: pair k (k = 0 .. pairs_per_prompt-1) of EVERY prompt uses ``seed_0 = seed_offset + 2k`` and
``seed_1 = seed_offset + 2k + 1``, so one set uses the seed range ``[seed_offset, seed_offset + 2·pairs_per_prompt)``.
For a training set and a held-out set with disjoint noise, give the held-out set
``seed_offset >= train_offset + 2·train_pairs_per_prompt`` (e.g. train at 0, held-out at 1_000_000).

:func:`relabel_preference_set` (``lora-dpo prefs --relabel``) is the paper's other AI-feedback experiment (§6):
keep a real preference set's captions and image pairs, replace its human labels by a scorer's (PickScore, CLIP
score, LAION aesthetics, ...), keeping the human label as ``label_0_original``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lora_dpo.data.images import MissingImage, image_source, to_rgb
from lora_dpo.feedback.scorers import Scorer
from lora_dpo.inference.sampling import generate_images, load_pipeline

logger = logging.getLogger(__name__)


def pair_seeds(k: int, seed_offset: int = 0) -> tuple[int, int]:
    """The seeds of pair ``k``: ``(seed_offset + 2k, seed_offset + 2k + 1)``."""
    return seed_offset + 2 * k, seed_offset + 2 * k + 1


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def labels_from_scores(score_0: np.ndarray, score_1: np.ndarray, tie_margin: float = 0.0) -> np.ndarray:
    """``label_0`` from two rewards: 1.0 where ``score_0 > score_1 + tie_margin``, 0.0 where
    ``score_1 > score_0 + tie_margin``, else 0.5 (a tie: ``|score_0 - score_1| <= tie_margin``)."""
    diff = np.asarray(score_0, dtype=np.float64) - np.asarray(score_1, dtype=np.float64)
    return np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))


@contextmanager
def _atomic_path(out_path: Path) -> Iterator[Path]:
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not prompts:
        raise ValueError("no prompts given")
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    if seed_offset < 0:
        raise ValueError(f"seed_offset must be >= 0, got {seed_offset}")
    # Fail fast (before any generation) on prompts the scorer cannot score, e.g. no digit for the classifier.
    unique = list(dict.fromkeys(prompts))
    scorer.score([Image.new("RGB", (32, 32))] * len(unique), unique)
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
        "jpg_0": pa.array([_png(img) for img in images[0::2]], pa.binary()),
        "jpg_1": pa.array([_png(img) for img in images[1::2]], pa.binary()),
        "label_0": pa.array(labels, pa.float64()),
        "score_0": pa.array(scores[:, 0]), "score_1": pa.array(scores[:, 1]),
        "seed_0": pa.array(seeds[:, 0]), "seed_1": pa.array(seeds[:, 1]),
    })
    out_path = Path(out_path)
    with _atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)

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
        "scorer": getattr(scorer, "name", type(scorer).__name__), "seed_offset": seed_offset,
        "seed_range": [seed_offset, seed_offset + 2 * pairs_per_prompt], "out": str(out_path),
    }


# ----------------------------------------------------------------------------------------------------------
# Relabelling a real preference set (AI feedback on real pairs)

RELABEL_REPORT_SUFFIX = ".report.json"


def _open_pairs(cfg: Any) -> tuple[Any, Path | None]:
    """``cfg.dataset`` opened as a stream by the data's own opener (the layouts, globs, hub ids, pair folders,
    ``image_root`` and column mapping of :func:`lora_dpo.data.sources.load_preference_dataset`), columns checked,
    every image-feature column left undecoded. Returns the ``IterableDataset`` and the image base folder."""
    import datasets

    from lora_dpo.data.sources import open_checked, undecoded

    source, base, _ = open_checked(cfg, streaming=True)
    if source.features is not None:
        source = undecoded(source, [c for c, f in source.features.items() if isinstance(f, datasets.Image)])
    return source, base


def _image_bytes(value: Any, base: Path | None) -> bytes:
    """The encoded bytes of an image value (bytes, a datasets ``{"bytes", "path"}`` dict, a path or uid resolved
    as the data module does, a PIL image: PNG). Raises :class:`lora_dpo.data.images.MissingImage` (``.reason``) when
    there is no image, other exceptions when the value cannot be read."""
    source = image_source(value, base)
    if isinstance(source, Image.Image):
        return _png(source)
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _decode_rgb(data: bytes) -> Image.Image:
    """Fully decode (a truncated file raises here, not only a bad header) and convert to RGB as training does."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def _as_label(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _output_schema(features: Any, image_columns: tuple[str, ...], float_columns: list[str]) -> Any:
    """The output's arrow schema from the input's datasets features (None when unknown): image columns binary,
    ``float_columns`` float64 (replaced where present, else appended in order), every other column as it was."""
    import pyarrow as pa

    if features is None:
        return None
    fields = []
    for f in features.arrow_schema:
        if f.name in image_columns:
            f = pa.field(f.name, pa.binary())
        elif f.name in float_columns:
            f = pa.field(f.name, pa.float64())
        fields.append(f)
    fields += [pa.field(c, pa.float64()) for c in float_columns if c not in features]
    return pa.schema(fields)  # no datasets metadata: it would describe the old image columns


def relabel_preference_set(dataset: str | Path, scorer: Scorer, out_path: str | Path, *, tie_margin: float = 0.0,
                           batch_size: int = 64, **data_options: Any) -> dict[str, Any]:
    """Re-label a preference set with a scorer (AI feedback on real pairs, Wallace et al. 2023 §6) and write a new
    Pick-a-Pic parquet. The input is read as a stream, ``batch_size`` pairs at a time, and the output written
    batch by batch: memory does not grow with the data set (nor is the input copied into the datasets cache).

    Args:
        dataset: anything ``data.dataset`` accepts (:func:`lora_dpo.data.sources.load_preference_dataset`): a .parquet /
            .arrow / .json / .jsonl / .csv file, a glob or folder of them, a ``save_to_disk`` folder, a ``w/`` +
            ``l/`` pair folder, or a hub id. Images as bytes, ``{"bytes", "path"}`` dicts, or paths / uids.
        scorer: any :class:`lora_dpo.feedback.scorers.Scorer` (higher = better), e.g. ``load_scorer(PICKSCORE_FOLDER)``.
        out_path: the output parquet, written to a hidden temporary file beside it and moved into place at the
            end; the report goes beside it as ``<name without .parquet>.report.json``.
        tie_margin: ``label_0`` = 1.0 when ``score_0 > score_1 + tie_margin``, 0.0 when
            ``score_1 > score_0 + tie_margin``, else 0.5 (:func:`labels_from_scores`).
        batch_size: pairs decoded and scored at a time.
        data_options: other :class:`lora_dpo.config.DataConfig` fields: ``split``, ``image_root``, column names
            (``caption_column``, ``image_columns``, ``label_column``, ``score_columns``), ``cache_dir``.

    Every row that can be scored is written, ties (old or new) included, with all of its columns. The image
    columns become binary columns holding each image's original encoded bytes (read from the file for paths;
    never re-encoded); ``label_0`` is the scorer's label; ``score_0`` / ``score_1`` (float64, replaced if present)
    the rewards, which ``data.min_score_gap`` reads; ``label_0_original`` the input's ``label_0`` (float64, null
    when not a number). When the input already has ``label_0_original`` (a relabelled set) that column is kept,
    and it is the "original" below. (Column names follow ``data_options``: ``<label_column>_original``.)
    Rows that cannot be scored are skipped and counted, never raised: ``missing_caption`` (not a string),
    ``missing_image`` / ``missing_image_file`` (no value / a path that names no file), ``undecodable_image``
    (images are fully decoded, so truncated files count too), ``nonfinite_score``.

    Returns:
        report (also written as JSON): ``input``, ``out``, ``report``, ``scorer``, ``tie_margin``, ``rows`` (input
        rows read), ``relabelled`` (rows written), ``skipped`` ({reason: rows}), ``ties`` (written rows the scorer
        calls a tie), ``label_0_counts`` (new labels: {"1.0", "0.0", "0.5"}), ``original_label_column``,
        ``original_label_counts`` (written rows: {"1.0", "0.0", "0.5", "other"}), ``compared`` (written rows whose
        original AND new labels are 0 or 1), ``agreed`` / ``flipped`` (of those: same / opposite label),
        ``agreement_rate`` (agreed / compared; None when nothing compares), ``original_ties_decided`` (original
        ties the scorer decides), ``mean_abs_margin`` (mean |score_0 - score_1| over written rows), ``seconds``,
        ``pairs_per_second``.

    Raises:
        ValueError: a required column is missing, ``tie_margin < 0``, ``batch_size < 1``, ``out_path`` is (or is
            inside) the input, no row can be scored, the scorer returns the wrong number of scores, or a column
            of an input without a typed schema (JSON / CSV) changes type between batches.
        FileNotFoundError: the data set does not exist.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lora_dpo.config import DataConfig

    if not np.isfinite(tie_margin) or tie_margin < 0:
        raise ValueError(f"tie_margin must be a finite number >= 0, got {tie_margin}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = DataConfig(**{**data_options, "dataset": str(dataset)})
    if cfg.label_column is None:
        raise ValueError("relabelling writes a label column: data.label_column must be a column name")
    out_path, source_path = Path(out_path), Path(dataset).expanduser()
    if source_path.exists() and (
        (source_path.is_file() and out_path.exists() and out_path.samefile(source_path))
        or (source_path.is_dir() and out_path.resolve().is_relative_to(source_path.resolve()))
    ):
        raise ValueError(f"out {out_path} is (inside) the input {dataset}; write the relabelled set elsewhere")
    start = time.perf_counter()
    source, base = _open_pairs(cfg)
    caption_col, image_cols, label_col = cfg.caption_column, tuple(cfg.image_columns), cfg.label_column
    original_col = f"{label_col}_original"
    new_cols = [label_col, original_col, *cfg.score_columns]
    features = source.features
    names = list(features) if features is not None else None
    original_source = original_col if names is not None and original_col in names else label_col
    schema = _output_schema(features, image_cols, new_cols)
    name = getattr(scorer, "name", type(scorer).__name__)

    rows = written = compared = agreed = old_ties_decided = 0
    skipped: Counter[str] = Counter()
    new_counts: Counter[float] = Counter()
    old_counts: Counter[str] = Counter()
    abs_margin_sum = 0.0
    with _atomic_path(out_path) as tmp:
        writer = None
        try:
            for batch in source.iter(batch_size=batch_size):
                n = len(batch[caption_col])
                rows += n
                if names is None:  # untyped input (JSON / CSV stream): the first batch sets the columns
                    names = list(batch)
                    original_source = original_col if original_col in names else label_col
                kept, blobs, images = [], [], []
                for i in range(n):
                    if not isinstance(batch[caption_col][i], str):
                        skipped["missing_caption"] += 1
                        continue
                    try:
                        data = [_image_bytes(batch[c][i], base) for c in image_cols]
                        decoded = [_decode_rgb(d) for d in data]
                    except MissingImage as exc:  # no image: missing_image / missing_image_file
                        skipped[exc.reason] += 1
                        continue
                    except Exception:  # data that does not read or decode: skip the row, never raise
                        skipped["undecodable_image"] += 1
                        continue
                    kept.append(i)
                    blobs.append(data)
                    images += decoded
                if not kept:
                    continue
                prompts = [batch[caption_col][i] for i in kept for _ in range(2)]
                scores = np.asarray(scorer.score(images, prompts), dtype=np.float64)
                if scores.shape != (len(images),):
                    raise ValueError(f"scorer {name!r} returned shape {scores.shape} for {len(images)} images")
                scores = scores.reshape(-1, 2)
                finite = np.isfinite(scores).all(axis=1)
                skipped["nonfinite_score"] += int((~finite).sum())
                kept = [k for k, ok in zip(kept, finite) if ok]
                blobs = [b for b, ok in zip(blobs, finite) if ok]
                scores = scores[finite]
                if not kept:
                    continue
                labels = labels_from_scores(scores[:, 0], scores[:, 1], tie_margin)
                originals = [_as_label(batch[original_source][i]) for i in kept]
                columns = {c: [batch[c][i] for i in kept] for c in names}
                columns.update({image_cols[0]: [b[0] for b in blobs], image_cols[1]: [b[1] for b in blobs],
                                label_col: labels.tolist(), original_col: originals,
                                cfg.score_columns[0]: scores[:, 0].tolist(), cfg.score_columns[1]: scores[:, 1].tolist()})
                if schema is None:
                    types = {c: pa.binary() for c in image_cols} | {c: pa.float64() for c in new_cols}
                    schema = pa.schema([pa.field(c, types[c]) if c in types else
                                        pa.field(c, pa.array(v).type) for c, v in columns.items()])
                try:
                    table = pa.Table.from_pydict({f.name: columns[f.name] for f in schema}, schema=schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise ValueError(f"'{dataset}': a column changes type between batches ({exc}); convert the "
                                     f"input to parquet (typed columns) first") from exc
                if writer is None:
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table)

                old = np.array([np.nan if v is None else v for v in originals])
                written += len(kept)
                new_counts.update(labels.tolist())
                old_counts.update(str(v) if v in (0.0, 0.5, 1.0) else "other" for v in old)
                both = np.isin(old, (0.0, 1.0)) & (labels != 0.5)
                compared += int(both.sum())
                agreed += int((both & (old == labels)).sum())
                old_ties_decided += int(((old == 0.5) & (labels != 0.5)).sum())
                abs_margin_sum += float(np.abs(scores[:, 0] - scores[:, 1]).sum())
        finally:
            if writer is not None:
                writer.close()
        skipped = Counter({k: v for k, v in skipped.items() if v})
        if not written:
            raise ValueError(f"no row of '{dataset}' could be scored ({rows} rows, skipped {dict(skipped)})")

    seconds = time.perf_counter() - start
    report_path = out_path.with_name(out_path.name.removesuffix(".parquet") + RELABEL_REPORT_SUFFIX)
    report = {
        "input": str(dataset), "out": str(out_path), "report": str(report_path), "scorer": name,
        "tie_margin": tie_margin, "rows": rows, "relabelled": written, "skipped": dict(sorted(skipped.items())),
        "ties": new_counts[0.5], "label_0_counts": {str(v): new_counts[v] for v in (1.0, 0.0, 0.5)},
        "original_label_column": original_source,
        "original_label_counts": {k: old_counts[k] for k in ("1.0", "0.0", "0.5", "other")},
        "compared": compared, "agreed": agreed, "flipped": compared - agreed,
        "agreement_rate": agreed / compared if compared else None, "original_ties_decided": old_ties_decided,
        "mean_abs_margin": abs_margin_sum / written, "seconds": round(seconds, 3),
        "pairs_per_second": round(written / seconds, 3) if seconds > 0 else None,
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("relabelled %d of %d rows of %s with %s: agreement %s on %d pairs, skipped %s", written, rows,
                dataset, name, report["agreement_rate"], compared, report["skipped"])
    return report
