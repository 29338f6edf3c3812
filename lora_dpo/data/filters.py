"""The load-time checks of one Pick-a-Pic-schema row, and their counts.

:class:`RowScanner` checks a row (label, score gap, ``are_different``, caption, image headers, identical
images) and computes its duplicate key; :class:`Admission` turns the results, in row order, into keep / skip
decisions counted by reason (:class:`SkipCounter`). Both the map-style load
(:func:`lora_dpo.data.sources.load_preference_dataset`) and the stream (:class:`lora_dpo.data.streaming.StreamedPairs`)
use them, so both keep the same rows.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import numpy as np

from lora_dpo.config import DataConfig
from lora_dpo.data.images import ImageBase, MissingImage, image_conversions, image_digest, open_image


class SkipCounter:
    """Counts skipped rows and converted images by reason; ``a.merge(b)`` adds, ``as_dict()`` is JSON-ready.

    ``skipped`` counts ROWS (pairs), e.g. ``{"tie": 12, "undecodable_image": 2}``; ``converted`` counts IMAGES,
    e.g. ``{"grayscale": 3, "rgba": 1, "palette": 1, "other_mode": 0, "upscaled": 2, "odd_size": 5}`` where
    ``upscaled`` = short side below the resolution and ``odd_size`` = a side that is not a multiple of 8.
    """

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.converted: Counter[str] = Counter()

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def convert(self, reason: str, n: int = 1) -> None:
        self.converted[reason] += n

    def merge(self, other: SkipCounter) -> SkipCounter:
        """Add ``other``'s counts into this counter (in place) and return it."""
        self.skipped.update(other.skipped)
        self.converted.update(other.converted)
        return self

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"skipped": dict(sorted(self.skipped.items())), "converted": dict(sorted(self.converted.items()))}


def _score_gap_reason(scores: list[Any], min_gap: float) -> str | None:
    """``missing_score`` / ``small_score_gap`` when the two rewards are absent or closer than ``min_gap``."""
    try:
        gap = abs(float(scores[0]) - float(scores[1]))
    except (TypeError, ValueError):
        return "missing_score"
    return None if gap >= min_gap else "small_score_gap"


def preferred_first(row: Mapping[str, Any], cfg: DataConfig) -> bool | str:
    """True when the first image column holds the preferred image, False for the second, or the skip reason
    (``bad_label``: not one of 0, 0.5, 1; ``tie``: 0.5). Without a label column the first is preferred."""
    if cfg.label_column is None:
        return True
    try:
        label = float(row[cfg.label_column])
    except (TypeError, ValueError):
        return "bad_label"
    if label == 0.5:
        return "tie"
    if label not in (0.0, 1.0):
        return "bad_label"
    return label == 1.0


def desirable(row: Mapping[str, Any], cfg: DataConfig) -> bool | str:
    """The binary label of an unpaired row (``data.desirable_column``): True (desirable) for true / 1, False for
    false / 0, else the skip reason ``bad_label``."""
    value = row[cfg.desirable_column]
    if isinstance(value, str):
        value = {"true": 1, "false": 0, "1": 1, "0": 0}.get(value.strip().lower())
    try:
        label = float(value)
    except (TypeError, ValueError):
        return "bad_label"
    return "bad_label" if label not in (0.0, 1.0) else label == 1.0


def row_images(row: Mapping[str, Any], cfg: DataConfig) -> list[Any] | str:
    """The image values of a row in training order, or the label's skip reason: a pair's preferred image first
    (:func:`preferred_first`), or an unpaired row's one image (its label valid, :func:`desirable`)."""
    if cfg.unpaired:
        label = desirable(row, cfg)
        return label if isinstance(label, str) else [row[cfg.image_column]]
    first = preferred_first(row, cfg)
    if isinstance(first, str):
        return first
    pair = [row[c] for c in cfg.image_columns]
    return pair if first else pair[::-1]


def _row_key(caption: str, digests: list[bytes], label: bool | None = None) -> int:
    """64 bits of sha1(caption, the images' digests in training order[, an unpaired row's label]): the duplicate
    key (JSON- and arrow-friendly; a collision among a billion rows has probability ~3e-2 · (n / 1e9)², i.e. none
    at Pick-a-Pic's size)."""
    h = hashlib.sha1(caption.encode("utf-8"))
    h.update(b"\0" + b"".join(digests) + (b"" if label is None else bytes([label])))
    return int.from_bytes(h.digest()[:8], "big", signed=True)


class RowScanner:
    """The load-time checks of one row, shared by the map-style load and the stream. Picklable
    (``datasets.map`` runs it in worker processes with ``data.num_proc``); called on a batch it returns the
    per-row results."""

    def __init__(self, cfg: DataConfig, base: ImageBase | None, column_names: list[str]) -> None:
        self.cfg, self.base = cfg, base
        ad = cfg.are_different_column
        self.are_different = ad if ad is not None and ad in column_names else None
        cols = [cfg.caption_column, *cfg.row_image_columns]
        cols += [cfg.row_label_column] if cfg.row_label_column is not None else []
        cols += list(cfg.score_columns) if cfg.min_score_gap is not None else []
        cols += [self.are_different] if self.are_different else []
        self.columns = list(dict.fromkeys(cols))  # what the checks (and the per-pair processing) read
        self.hashing = cfg.drop_duplicates or cfg.drop_identical_images

    def check(self, row: Mapping[str, Any]) -> tuple[str | None, list[str], int | None]:
        """``(skip reason or None, image conversions, duplicate key or None)``. Checks, first failing one
        wins: score gap, label (``bad_label``, ``tie``), ``not_different``, ``missing_caption``, the images'
        headers (``missing_image``, ``missing_image_file``, ``image_outside_root``: a path leaving a confined
        ``base``, never opened; ``undecodable_image``), then with hashing
        ``identical_images``. Header-only image check: ``Image.open`` + ``.size``. An unpaired row
        (``data.unpaired``) has one image, a binary label (``bad_label``) and no score gap or identical images;
        its duplicate key includes the label."""
        cfg = self.cfg
        if cfg.min_score_gap is not None:
            reason = _score_gap_reason([row[c] for c in cfg.score_columns], cfg.min_score_gap)
            if reason:
                return reason, [], None
        pair = row_images(row, cfg)
        if isinstance(pair, str):
            return pair, [], None
        if self.are_different and row[self.are_different] is not None and not row[self.are_different]:
            return "not_different", [], None
        caption = row[cfg.caption_column]
        if not isinstance(caption, str):
            return "missing_caption", [], None
        conversions: list[str] = []
        for value in pair:
            try:
                img = open_image(value, self.base)
                conversions += image_conversions(img, cfg.resolution)  # mode and size come from the header
                if img is not value:
                    img.close()
            except MissingImage as exc:
                return exc.reason, [], None
            except Exception:  # any failure to read the header means "not an image"
                return "undecodable_image", [], None
        if not self.hashing:
            return None, conversions, None
        try:
            digests = [image_digest(value, self.base) for value in pair]
        except MissingImage as exc:  # the file went away
            return exc.reason, [], None
        except Exception:  # the file cannot be read
            return "undecodable_image", [], None
        if cfg.drop_identical_images and digests[0] == digests[1]:
            return "identical_images", [], None
        label = desirable(row, cfg) if cfg.unpaired else None
        return None, conversions, _row_key(caption, digests, label) if cfg.drop_duplicates else None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"reason": [], "conversions": [], "key": []}
        for values in zip(*(batch[c] for c in self.columns)):
            reason, conversions, key = self.check(dict(zip(self.columns, values)))
            out["reason"].append(reason)
            out["conversions"].append(conversions)
            out["key"].append(key)
        return out


_SCAN_FEATURES = datasets.Features({"reason": datasets.Value("string"),
                                    "conversions": datasets.List(datasets.Value("string")),
                                    "key": datasets.Value("int64")})


class Admission:
    """Per-row check results -> keep or skip, in row order: counts reasons (``duplicate`` when the key of a
    row that passed every check was seen before: the first one is kept) and the kept rows' image
    conversions."""

    def __init__(self) -> None:
        self.counter, self.seen, self.scanned, self.kept = SkipCounter(), set(), 0, 0

    def admit(self, reason: str | None, conversions: list[str], key: int | None) -> bool:
        self.scanned += 1
        if reason is None and key is not None:
            if key in self.seen:
                reason = "duplicate"
            else:
                self.seen.add(key)
        if reason is not None:
            self.counter.skip(reason)
            return False
        for conversion in conversions:
            self.counter.convert(conversion)
        self.kept += 1
        return True

    def report(self) -> dict[str, Any]:
        return {"scanned": self.scanned, "kept": self.kept, **self.counter.as_dict()}

    def state_dict(self) -> dict[str, Any]:
        keys = np.array(sorted(self.seen), dtype=np.int64).tobytes()
        return {**self.report(), "seen": base64.b64encode(keys).decode("ascii")}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Admission:
        new = cls()
        new.scanned, new.kept = int(state["scanned"]), int(state["kept"])
        new.counter.skipped.update(state["skipped"])
        new.counter.converted.update(state["converted"])
        new.seen = set(np.frombuffer(base64.b64decode(state["seen"]), dtype=np.int64).tolist())
        return new


def scan_rows(table: datasets.Dataset, scanner: RowScanner, num_proc: int | None) -> Iterator[tuple]:
    """Each row's check result, in order: in this process batch by batch (lazily: a caller that stops early
    checks no further), or all rows at once with ``datasets.map`` over ``num_proc`` processes."""
    if num_proc is not None and num_proc > 1 and len(table) > 1:
        table = table.map(scanner, batched=True, batch_size=64, num_proc=min(num_proc, len(table)),
                          remove_columns=table.column_names, features=_SCAN_FEATURES, keep_in_memory=True,
                          load_from_cache_file=False, desc="checking pairs")
        for batch in table.iter(batch_size=1024):
            yield from zip(batch["reason"], batch["conversions"], batch["key"])
        return
    for batch in table.iter(batch_size=256):
        out = scanner(batch)
        yield from zip(out["reason"], out["conversions"], out["key"])
