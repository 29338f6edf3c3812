"""Relabel a real preference set with a scorer: AI feedback on real pairs (``lora-dpo prefs --relabel``).

This is Diffusion-DPO's other AI-feedback experiment (Wallace et al. 2023, arXiv 2311.12908, §6): keep a real
preference set's captions and image pairs, replace its human labels by a scorer's (PickScore, CLIP score, LAION
aesthetics, ...), keeping the human label as ``label_0_original``. The input is read as a stream and written batch
by batch (:func:`relabel_preference_set`); sampling new pairs is :mod:`lora_dpo.feedback.prefs`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lora_dpo.config import DataConfig
from lora_dpo.data.images import ImageBase, MissingImage, image_source, to_rgb
from lora_dpo.data.sources import open_checked, read_rows, undecoded
from lora_dpo.feedback.prefs import atomic_path, labels_from_scores, png_bytes
from lora_dpo.feedback.scorers import Scorer

logger = logging.getLogger(__name__)

RELABEL_REPORT_SUFFIX = ".report.json"


def _open_pairs(cfg: Any) -> tuple[Any, ImageBase | None]:
    """``cfg.dataset`` opened as a stream by the data's own opener (the layouts, globs, hub ids, pair folders,
    ``image_root`` and column mapping of :func:`lora_dpo.data.sources.load_preference_dataset`), columns checked,
    every image-feature column left undecoded. Returns the ``IterableDataset`` and the image base (confined to
    ``image_root`` when given)."""
    source, base, _ = open_checked(cfg, streaming=True)
    if source.features is not None:
        source = undecoded(source, [c for c, f in source.features.items() if isinstance(f, datasets.Image)])
    return source, base


def _image_bytes(value: Any, base: ImageBase | None) -> bytes:
    """The encoded bytes of an image value (bytes, a datasets ``{"bytes", "path"}`` dict, a path or uid resolved
    as the data module does, a PIL image: PNG). Raises :class:`lora_dpo.data.images.MissingImage` (``.reason``) when
    there is no image or it lies outside a confined ``base`` (``image_outside_root``, never read), other exceptions
    when the value cannot be read."""
    source = image_source(value, base)
    if isinstance(source, Image.Image):
        return png_bytes(source)
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


def _check_out_path(out_path: Path, dataset: str | Path) -> None:
    """Raises ValueError when ``out_path`` is the input file or lies inside the input folder."""
    source_path = Path(dataset).expanduser()
    if source_path.exists() and (
        (source_path.is_file() and out_path.exists() and out_path.samefile(source_path))
        or (source_path.is_dir() and out_path.resolve().is_relative_to(source_path.resolve()))
    ):
        raise ValueError(f"out {out_path} is (inside) the input {dataset}; write the relabelled set elsewhere")


@dataclass
class _Columns:
    """The columns of a relabelling: the ones read (``caption``, the two ``images``, the original label's
    ``original_source``), the ones written (``label``, ``original``, ``scores``) and the output ``schema``.

    ``names`` (the input's columns) and ``schema`` are None until known: an untyped input (a JSON / CSV stream) has
    no features, and its first batch sets them and ``original_source`` (:meth:`see`, :meth:`table`).
    """

    caption: str
    images: tuple[str, ...]
    label: str
    scores: list[str]
    names: list[str] | None
    original_source: str
    schema: Any

    @classmethod
    def of(cls, cfg: DataConfig, features: Any) -> _Columns:
        """The columns of ``cfg`` over an input with datasets ``features`` (None when unknown)."""
        original = f"{cfg.label_column}_original"
        names = list(features) if features is not None else None
        columns = cls(cfg.caption_column, tuple(cfg.image_columns), cfg.label_column, list(cfg.score_columns),
                      names, original if names is not None and original in names else cfg.label_column, None)
        columns.schema = _output_schema(features, columns.images, columns.written)
        return columns

    @property
    def original(self) -> str:
        """The column that keeps the input's label: ``<label>_original``."""
        return f"{self.label}_original"

    @property
    def written(self) -> list[str]:
        """The float64 columns the relabelling writes: the label, the original label, the two scores."""
        return [self.label, self.original, *self.scores]

    def see(self, batch: dict[str, list]) -> None:
        """Take the input's columns from its first batch when the input has no schema."""
        if self.names is None:  # untyped input (JSON / CSV stream): the first batch sets the columns
            self.names = list(batch)
            self.original_source = self.original if self.original in self.names else self.label

    def table(self, values: dict[str, list], dataset: str | Path) -> pa.Table:
        """``values`` (every output column) as an arrow table of :attr:`schema`, inferred from the first batch when
        the input has none. Raises ValueError when a column of an untyped input changes type between batches."""
        if self.schema is None:
            types = {c: pa.binary() for c in self.images} | {c: pa.float64() for c in self.written}
            self.schema = pa.schema([pa.field(c, types[c]) if c in types else
                                     pa.field(c, pa.array(v).type) for c, v in values.items()])
        try:
            return pa.Table.from_pydict({f.name: values[f.name] for f in self.schema}, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"'{dataset}': a column changes type between batches ({exc}); convert the "
                             f"input to parquet (typed columns) first") from exc


class _Tally:
    """What a relabelling has read, written and skipped (by reason), and how its labels compare with the original
    ones: counts of rows, and of new labels and original labels by value."""

    def __init__(self) -> None:
        self.rows = self.written = self.compared = self.agreed = self.old_ties_decided = 0
        self.abs_margin_sum = 0.0
        self.skipped: Counter[str] = Counter()
        self.new_counts: Counter[float] = Counter()
        self.old_counts: Counter[str] = Counter()

    def add(self, labels: np.ndarray, originals: list[float | None], scores: np.ndarray) -> None:
        """Count written rows: their new ``labels`` ``(R,)``, their ``originals`` (None: not a number) and their
        ``scores`` ``(R, 2)``."""
        old = np.array([np.nan if v is None else v for v in originals])
        self.written += len(labels)
        self.new_counts.update(labels.tolist())
        self.old_counts.update(str(v) if v in (0.0, 0.5, 1.0) else "other" for v in old)
        both = np.isin(old, (0.0, 1.0)) & (labels != 0.5)
        self.compared += int(both.sum())
        self.agreed += int((both & (old == labels)).sum())
        self.old_ties_decided += int(((old == 0.5) & (labels != 0.5)).sum())
        self.abs_margin_sum += float(np.abs(scores[:, 0] - scores[:, 1]).sum())

    def report(self, original_source: str, seconds: float) -> dict[str, Any]:
        """The report's fields from ``rows`` to ``pairs_per_second``."""
        new, old = self.new_counts, self.old_counts
        return {
            "rows": self.rows, "relabelled": self.written, "skipped": dict(sorted(self.skipped.items())),
            "ties": new[0.5], "label_0_counts": {str(v): new[v] for v in (1.0, 0.0, 0.5)},
            "original_label_column": original_source,
            "original_label_counts": {k: old[k] for k in ("1.0", "0.0", "0.5", "other")},
            "compared": self.compared, "agreed": self.agreed, "flipped": self.compared - self.agreed,
            "agreement_rate": self.agreed / self.compared if self.compared else None,
            "original_ties_decided": self.old_ties_decided,
            "mean_abs_margin": self.abs_margin_sum / self.written, "seconds": round(seconds, 3),
            "pairs_per_second": round(self.written / seconds, 3) if seconds > 0 else None,
        }


def _decode_rows(batch: dict[str, list], columns: _Columns, base: ImageBase | None,
                 skipped: Counter[str]) -> tuple[list[int], list[list[bytes]], list[Image.Image]]:
    """The rows of ``batch`` with a caption and two readable images: their indices, their images' encoded bytes
    and the decoded images (two per row, in order). Other rows are counted into ``skipped``, never raised."""
    kept, blobs, images = [], [], []
    for i in range(len(batch[columns.caption])):
        if not isinstance(batch[columns.caption][i], str):
            skipped["missing_caption"] += 1
            continue
        try:
            data = [_image_bytes(batch[c][i], base) for c in columns.images]
            decoded = [_decode_rgb(d) for d in data]
        except MissingImage as exc:  # no image: missing_image / missing_image_file / image_outside_root
            skipped[exc.reason] += 1
            continue
        except Exception:  # data that does not read or decode: skip the row, never raise
            skipped["undecodable_image"] += 1
            continue
        kept.append(i)
        blobs.append(data)
        images += decoded
    return kept, blobs, images


def _score_rows(scorer: Scorer, name: str, prompts: list[str], images: list[Image.Image],
                skipped: Counter[str]) -> tuple[np.ndarray, np.ndarray]:
    """Score the images (two per row, ``prompts`` repeated likewise): ``(scores (R, 2) float64, finite (R,) bool)``;
    rows with a non-finite score are counted into ``skipped``. Raises ValueError for a wrong number of scores."""
    scores = np.asarray(scorer.score(images, prompts), dtype=np.float64)
    if scores.shape != (len(images),):
        raise ValueError(f"scorer {name!r} returned shape {scores.shape} for {len(images)} images")
    scores = scores.reshape(-1, 2)
    finite = np.isfinite(scores).all(axis=1)
    skipped["nonfinite_score"] += int((~finite).sum())
    return scores, finite


def _relabel_batch(batch: dict[str, list], columns: _Columns, tally: _Tally, scorer: Scorer, name: str, *,
                   base: ImageBase | None, tie_margin: float, dataset: str | Path) -> pa.Table | None:
    """One input batch relabelled: the table of its rows that could be scored (None when none could), counted
    into ``tally``."""
    tally.rows += len(batch[columns.caption])
    columns.see(batch)
    kept, blobs, images = _decode_rows(batch, columns, base, tally.skipped)
    if not kept:
        return None
    prompts = [batch[columns.caption][i] for i in kept for _ in range(2)]
    scores, finite = _score_rows(scorer, name, prompts, images, tally.skipped)
    kept = [k for k, ok in zip(kept, finite) if ok]
    blobs = [b for b, ok in zip(blobs, finite) if ok]
    scores = scores[finite]
    if not kept:
        return None
    labels = labels_from_scores(scores[:, 0], scores[:, 1], tie_margin)
    originals = [_as_label(batch[columns.original_source][i]) for i in kept]
    values = {c: [batch[c][i] for i in kept] for c in columns.names}
    values.update({columns.images[0]: [b[0] for b in blobs], columns.images[1]: [b[1] for b in blobs],
                   columns.label: labels.tolist(), columns.original: originals,
                   columns.scores[0]: scores[:, 0].tolist(), columns.scores[1]: scores[:, 1].tolist()})
    table = columns.table(values, dataset)
    tally.add(labels, originals, scores)
    return table


def _write_relabelled(source: Any, path: Path, columns: _Columns, tally: _Tally, scorer: Scorer, name: str, *,
                      base: ImageBase | None, tie_margin: float, batch_size: int, cfg: DataConfig) -> None:
    """Relabel ``source`` ``batch_size`` rows at a time and append each batch's table to the parquet ``path``
    (created with the first table; nothing is written when no row can be scored). Raises DataError when a data
    file cannot be read (:func:`lora_dpo.data.sources.read_rows`)."""
    writer, dataset = None, cfg.dataset
    try:
        for batch in read_rows(source.iter(batch_size=batch_size), cfg):
            table = _relabel_batch(batch, columns, tally, scorer, name, base=base, tie_margin=tie_margin,
                                   dataset=dataset)
            if table is None:
                continue
            if writer is None:
                writer = pq.ParquetWriter(path, columns.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


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
            (``caption_column``, ``image_columns``, ``label_column``, ``score_columns``), ``cache_dir``, ``encoding``.

    Every row that can be scored is written, ties (old or new) included, with all of its columns. The image
    columns become binary columns holding each image's original encoded bytes (read from the file for paths;
    never re-encoded); ``label_0`` is the scorer's label; ``score_0`` / ``score_1`` (float64, replaced if present)
    the rewards, which ``data.min_score_gap`` reads; ``label_0_original`` the input's ``label_0`` (float64, null
    when not a number). When the input already has ``label_0_original`` (a relabelled set) that column is kept,
    and it is the "original" below. (Column names follow ``data_options``: ``<label_column>_original``.)
    Rows that cannot be scored are skipped and counted, never raised: ``missing_caption`` (not a string),
    ``missing_image`` / ``missing_image_file`` (no value / a path that names no file), ``image_outside_root`` (a
    path outside ``image_root``, never read), ``undecodable_image``
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
        DataError: the data set has no rows or a file cannot be read (not valid ``encoding`` text, not what its
            suffix says); the message names the file.
    """
    if not np.isfinite(tie_margin) or tie_margin < 0:
        raise ValueError(f"tie_margin must be a finite number >= 0, got {tie_margin}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = DataConfig(**{**data_options, "dataset": str(dataset)})
    if cfg.label_column is None:
        raise ValueError("relabelling writes a label column: data.label_column must be a column name")
    out_path = Path(out_path)
    _check_out_path(out_path, dataset)
    start = time.perf_counter()
    source, base = _open_pairs(cfg)
    columns = _Columns.of(cfg, source.features)
    name = getattr(scorer, "name", type(scorer).__name__)
    tally = _Tally()
    with atomic_path(out_path) as tmp:
        _write_relabelled(source, tmp, columns, tally, scorer, name, base=base, tie_margin=tie_margin,
                          batch_size=batch_size, cfg=cfg)
        tally.skipped = Counter({k: v for k, v in tally.skipped.items() if v})
        if not tally.written:
            raise ValueError(f"no row of '{dataset}' could be scored ({tally.rows} rows, skipped {dict(tally.skipped)})")

    seconds = time.perf_counter() - start
    report_path = out_path.with_name(out_path.name.removesuffix(".parquet") + RELABEL_REPORT_SUFFIX)
    report = {"input": str(dataset), "out": str(out_path), "report": str(report_path), "scorer": name,
              "tie_margin": tie_margin, **tally.report(columns.original_source, seconds)}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("relabelled %d of %d rows of %s with %s: agreement %s on %d pairs, skipped %s", tally.written,
                tally.rows, dataset, name, report["agreement_rate"], tally.compared, report["skipped"])
    return report
