"""Preference pairs in the Pick-a-Pic schema -> oriented, cropped, batched image pairs for Diffusion-DPO.

Source: Wallace et al. 2023 (arXiv 2311.12908), §5: each row holds a caption, two images (``jpg_0``, ``jpg_1``)
and ``label_0`` (1: ``jpg_0`` preferred, 0: ``jpg_1`` preferred, 0.5: tie). Ties carry no preference and are
dropped. Everywhere below the PREFERRED image (x_w) comes first and the rejected one (x_l) second.

Flow: :func:`load_preference_dataset` (cheap checks, counted by reason) -> :class:`PreferencePairs`
(decode, orient, RGB, resize, one crop/flip/caption-dropout draw per pair) -> :class:`PairSampler`
(deterministic, resumable, sharded order) -> :func:`collate_pairs` -> :class:`PairBatch`.

Streaming (``data.streaming``): :class:`StreamingPairs` runs the same checks and the same per-pair processing
on the fly over a datasets ``IterableDataset``, one share per process, with a resumable position.

Other layouts are mapped into the Pick-a-Pic schema on loading (the configured column names), so everything
downstream is unchanged: a ``w/`` + ``l/`` image folder with ``metadata.jsonl`` (:func:`_pair_folder`), a
table of ``preferred``/``rejected`` columns (e.g. a CSV of paths), Pick-a-Pic's ``*_no_images`` tables whose
image columns name files under ``data.image_root``.
"""

from __future__ import annotations

import base64
import difflib
import glob
import hashlib
import io
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image

from lora_dpo.config import DataConfig

logger = logging.getLogger(__name__)

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
# Image files: the suffixes of a w/ + l/ pair folder, and those tried after a name that is not a file (uids).
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Hub-style shard names (``push_to_hub``, Pick-a-Pic's ``data/train-00000-of-00645-….parquet``): SPLIT-i-of-n.
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z][A-Za-z0-9_]*)-\d+-of-\d+")
# The convention of pair tables without a label: the preferred and the rejected image, in these columns.
_PAIR_COLUMNS = ("preferred", "rejected")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_GRAY_MODES = {"1", "L", "I", "F"}
# Salts keep the sampler's and the per-item random streams apart.
_SAMPLER_SALT, _ITEM_SALT = 0x5A3D, 0x17E4


@dataclass(frozen=True)
class SkippedRow:
    """Marker returned by :meth:`PreferencePairs.__getitem__` for a row that cannot be used."""

    reason: str
    index: int = -1


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


# ----------------------------------------------------------------------------------------------------------
# Image helpers


class _Unusable(Exception):
    """A row's image is absent: ``reason`` is ``missing_image`` (no value) or ``missing_image_file`` (a path
    or uid that names no file)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _find_file(name: str, base: Path | None) -> Path | None:
    """The file ``name`` names (relative names resolved against ``base``), else ``name`` + one of
    :data:`_IMAGE_SUFFIXES` (first found, in that order: Pick-a-Pic's uids carry no suffix), else None."""
    path = Path(name).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_file():
        return path
    for suffix in _IMAGE_SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _image_source(value: Any, base: Path | None) -> bytes | Path | Image.Image:
    """Where an image value's data is: bytes, a file, or an open PIL image. A value is bytes, a datasets
    ``{"bytes", "path"}`` dict, a PIL image, or a path / uid (str).

    Raises:
        _Unusable: no value (None, empty, NaN from a CSV cell) or a path that names no file.
        TypeError: any other kind of value.
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _Unusable("missing_image")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise _Unusable("missing_image")
        return bytes(value)
    if isinstance(value, str):
        if not value.strip():
            raise _Unusable("missing_image")
        found = _find_file(value, base)
        if found is None:
            raise _Unusable("missing_image_file")
        return found
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def _open_image(value: Any, base: Path | None = None) -> Image.Image:
    """Open lazily (header only) an image value (see :func:`_image_source`; relative paths resolved against
    ``base``). Raises :class:`_Unusable` when there is no image, OSError etc. when the data is not an
    image."""
    source = _image_source(value, base)
    if isinstance(source, Image.Image):
        return source
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _image_digest(value: Any, base: Path | None = None) -> bytes:
    """sha1 of the image's stored bytes (the file's bytes for a path; the pixels for a PIL image)."""
    source = _image_source(value, base)
    if isinstance(source, Image.Image):
        data = source.mode.encode() + repr(source.size).encode() + source.tobytes()
    else:
        data = source if isinstance(source, bytes) else source.read_bytes()
    return hashlib.sha1(data).digest()


def _conversions(img: Image.Image, resolution: int) -> list[str]:
    """The conversion reasons :func:`_to_rgb` and the resize will apply to ``img`` (header information only)."""
    reasons = []
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        reasons.append("rgba")
    elif img.mode == "P":
        reasons.append("palette")
    elif img.mode in _GRAY_MODES or img.mode.startswith("I;16"):
        reasons.append("grayscale")
    elif img.mode != "RGB":
        reasons.append("other_mode")
    width, height = img.size
    if min(width, height) < resolution:
        reasons.append("upscaled")
    if width % 8 or height % 8:
        reasons.append("odd_size")
    return reasons


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white; 16/32-bit grayscale is scaled by 1/257
    (16-bit range assumed); float images are clipped to [0, 255]."""
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0 if img.mode.startswith("I") else arr
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize_short_side(img: Image.Image, resolution: int) -> Image.Image:
    """Resize (Lanczos) so the short side equals ``resolution``, keeping the aspect ratio."""
    width, height = img.size
    if min(width, height) == resolution:
        return img
    if width <= height:
        size = (resolution, max(resolution, round(height * resolution / width)))
    else:
        size = (max(resolution, round(width * resolution / height)), resolution)
    return img.resize(size, Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------------------
# Loading and load-time filtering


def _did_you_mean(name: str, choices: list[str], key: str) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.0)
    return f"set {key}{', e.g. to ' + repr(close[0]) if close else ''}"


def _check_columns(column_names: list[str], cfg: DataConfig, source: str) -> None:
    """Raise ValueError naming each missing column, the available ones and the DataConfig field to set."""
    wanted = [
        (cfg.caption_column, "data.caption_column"),
        (cfg.image_columns[0], "data.image_columns"),
        (cfg.image_columns[1], "data.image_columns"),
    ]
    if cfg.label_column is not None:
        wanted.append((cfg.label_column, "data.label_column"))
    missing = [(col, key) for col, key in wanted if col not in column_names]
    if missing:
        hints = [f"column '{col}' ({_did_you_mean(col, column_names, key)})" for col, key in missing]
        keys = {key for _, key in missing}
        extra = ""
        if "data.image_columns" in keys and {"image_0_uid", "image_1_uid"} <= set(column_names):
            extra = (" This looks like Pick-a-Pic's *_no_images layout (image uids instead of image bytes): "
                     "set data.image_columns=[image_0_uid, image_1_uid] and data.image_root to the folder of "
                     "the images.")
        elif keys == {"data.label_column"}:
            extra = " If the first image column always holds the preferred image, set data.label_column=null."
        available = ", ".join(column_names)
        raise ValueError(f"dataset '{source}' lacks {'; '.join(hints)}. Available columns: {available}."
                         + extra)


def _check_optional_columns(column_names: list[str], cfg: DataConfig) -> None:
    """The columns of the optional filters: score columns (``min_score_gap``) and a renamed
    ``are_different``."""
    if cfg.min_score_gap is not None:
        missing = [c for c in cfg.score_columns if c not in column_names]
        if missing:
            raise ValueError(
                f"data.min_score_gap needs score columns {missing} in '{cfg.dataset}' (set "
                f"data.score_columns); available columns: {', '.join(column_names)}"
            )
    # The default name is Pick-a-Pic's and optional; a name the recipe chose must exist (a typo would silently
    # turn the filter off).
    name = cfg.are_different_column
    if name not in (None, "are_different") and name not in column_names:
        raise ValueError(
            f"data.are_different_column='{name}' is not a column of '{cfg.dataset}' "
            f"({_did_you_mean(name, column_names, 'data.are_different_column')}, or null for no such "
            f"filter); available columns: {', '.join(column_names)}"
        )


def _image_root(cfg: DataConfig) -> Path | None:
    if cfg.image_root is None:
        return None
    root = Path(cfg.image_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.image_root='{cfg.image_root}' is not a folder; set it to the folder "
                                f"that holds the image files named in the image columns")
    return root


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def _load_files(files: list[Path], cfg: DataConfig, streaming: bool) -> Any:
    """``load_dataset(builder, data_files=files)``: a ``Dataset`` (an ``IterableDataset`` when streaming)."""
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders:
        raise FileNotFoundError(
            f"data.dataset='{cfg.dataset}' holds no .parquet/.arrow/.json/.jsonl/.csv data; point "
            f"data.dataset at such a file, a folder or glob of them, a save_to_disk folder or a w/+l/ folder"
        )
    if len(builders) > 1:
        raise ValueError(f"'{cfg.dataset}' mixes file types ({sorted(builders)}); point data.dataset at one "
                         f"kind")
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train",
                                 cache_dir=cfg.cache_dir, streaming=streaming)


def _split_files(files: list[Path], folder: Path, split: str) -> list[Path]:
    """Of a folder whose files are all hub-style shards (``SPLIT-00000-of-00009…``, as in a snapshot of a hub
    data set), those of ``split``: mixing Pick-a-Pic's train and test shards would train on the test set. Any
    other folder: all its files."""
    matches = [_SHARD_NAME.match(p.name) for p in files]
    if not files or not all(matches):
        return files
    chosen = [p for p, m in zip(files, matches) if m["split"] == split]
    if not chosen:
        splits = sorted({m["split"] for m in matches})
        raise ValueError(f"'{folder}' holds the splits {splits} (shards named SPLIT-00000-of-NNNNN), not "
                         f"data.split='{split}'; set data.split to one of them")
    return chosen


def _pair_folder(root: Path, cfg: DataConfig) -> datasets.Dataset:
    """A folder of pairs as files -> rows of the Pick-a-Pic schema (the configured columns; label 1.0).

    Layout (diffusers' ImageFolder ``metadata.jsonl`` convention)::

        root/metadata.jsonl   one JSON object per line: {"file_name": "0001.png", "caption": "a red fox"}
        root/w/0001.png       the preferred image
        root/l/0001.png       the rejected image (same relative file name; subfolders allowed)

    The caption key is ``data.caption_column``. Rows: the metadata's file names in order, then image names
    found under ``w/`` or ``l/`` without a metadata line (sorted; they have no caption: ``missing_caption``).
    An image missing on one side is counted as ``missing_image_file`` by the load-time checks.
    """
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        example = json.dumps({"file_name": "0001.png", cfg.caption_column: "the caption"})
        raise FileNotFoundError(f"'{root}' has w/ and l/ image folders but no metadata.jsonl; write one line "
                                f"per pair: {example}")
    captions: dict[str, Any] = {}
    keys: set[str] = set()
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta}:{n} is not a JSON object ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise ValueError(f'{meta}:{n} lacks "file_name" (the image\'s name under w/ and l/)')
        keys.update(record)
        captions.setdefault(record["file_name"], record.get(cfg.caption_column))
    if captions and cfg.caption_column not in keys:
        keys.discard("file_name")
        raise ValueError(f"{meta} has no '{cfg.caption_column}' key "
                         f"({_did_you_mean(cfg.caption_column, sorted(keys), 'data.caption_column')}); "
                         f"keys: {', '.join(sorted(keys))}")
    found = {
        p.relative_to(root / side).as_posix()
        for side in ("w", "l") for p in (root / side).rglob("*")
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    }
    names = list(captions) + sorted(found - set(captions))
    columns: dict[str, list] = {
        cfg.caption_column: [captions.get(name) for name in names],
        cfg.image_columns[0]: [str(root / "w" / name) for name in names],
        cfg.image_columns[1]: [str(root / "l" / name) for name in names],
    }
    if cfg.label_column is not None:
        columns[cfg.label_column] = [1.0] * len(names)
    features = datasets.Features({name: datasets.Value("float64" if name == cfg.label_column else "string")
                                  for name in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def _open_source(cfg: DataConfig, streaming: bool = False) -> tuple[Any, Path | None]:
    """Open ``cfg.dataset`` (see :func:`load_preference_dataset`) as a ``Dataset``, or an ``IterableDataset``
    when ``streaming``. Returns it and the folder relative image paths are resolved against:
    ``data.image_root``, else the data's folder (None for hub data)."""
    name = cfg.dataset
    path = Path(name).expanduser()
    root = _image_root(cfg)
    if _is_glob(name):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"data.dataset='{name}' matches no file; check the pattern (e.g. "
                                    f"/data/pickapic/train-*.parquet)")
        fixed = path.parts[: next(i for i, part in enumerate(path.parts) if _is_glob(part))]  # folders above
        return _load_files(files, cfg, streaming), root or (Path(*fixed) if fixed else Path.cwd())
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.suffix in _BUILDERS
    if not path.exists():
        if looks_local or name.count("/") > 1:
            raise FileNotFoundError(
                f"data.dataset='{name}' does not exist. Set data.dataset to a .parquet/.arrow/.json/.jsonl/"
                f".csv file, a folder or glob of such files, a Dataset.save_to_disk folder, a w/ + l/ pair "
                f"folder, or a hub id such as yuvalkirstain/pickapic_v2"
            )
        try:
            loaded = datasets.load_dataset(name, split=cfg.split, cache_dir=cfg.cache_dir,
                                           streaming=streaming)
        except (FileNotFoundError, ConnectionError) as exc:
            raise FileNotFoundError(
                f"data.dataset='{name}' is not a local path and could not be loaded from the hub ({exc}). "
                f"Check the id and the network (offline, HF_HUB_OFFLINE=1 needs the data in the cache: "
                f"data.cache_dir or HF_DATASETS_CACHE), or download it (e.g. `hf download {name} --repo-type "
                f"dataset --local-dir DIR`) and set data.dataset=DIR or a glob such as "
                f"'DIR/data/train-*.parquet'"
            ) from exc
        return loaded, root
    if path.is_dir() and (path / "w").is_dir() and (path / "l").is_dir():
        pairs = _pair_folder(path, cfg)
        return (pairs.to_iterable_dataset() if streaming else pairs), root or path
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise ValueError(f"'{name}' has splits {list(loaded)}, not data.split='{cfg.split}'")
            loaded = loaded[cfg.split]
        return (loaded.to_iterable_dataset() if streaming else loaded), root or path
    if path.is_file():
        files = [path]
    else:
        files = _split_files(sorted(
            p for p in path.rglob("*")
            if p.suffix in _BUILDERS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ), path, cfg.split)
    return _load_files(files, cfg, streaming), root or (path if path.is_dir() else path.parent)


def _column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    """Column names; a stream of unknown features (json, csv) is asked for its first row."""
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)
    return list(first) if first is not None else []


def _map_pair_columns(ds: Any, names: list[str], cfg: DataConfig) -> tuple[Any, list[str]]:
    """A table of ``preferred``/``rejected`` image columns (e.g. a CSV ``caption,preferred,rejected``),
    holding neither configured image column nor the label column -> the Pick-a-Pic schema: the two columns
    renamed to ``data.image_columns`` (preferred first) and a label column of 1.0. Any other table:
    unchanged."""
    present = set(names)
    if present & set(cfg.image_columns) or not set(_PAIR_COLUMNS) <= present or cfg.label_column in present:
        return ds, names
    ds = ds.rename_columns(dict(zip(_PAIR_COLUMNS, cfg.image_columns)))
    if cfg.label_column is not None:
        if isinstance(ds, datasets.IterableDataset):
            features = None
            if ds.features is not None:
                features = ds.features.copy()
                features[cfg.label_column] = datasets.Value("float64")
            ds = ds.map(lambda _row: {cfg.label_column: 1.0}, features=features)
        else:
            ds = ds.add_column(cfg.label_column, [1.0] * len(ds))
    logger.info("data %s: columns %s read as the preferred and the rejected image", cfg.dataset,
                _PAIR_COLUMNS)
    names = [cfg.image_columns[_PAIR_COLUMNS.index(n)] if n in _PAIR_COLUMNS else n for n in names]
    return ds, names + ([cfg.label_column] if cfg.label_column is not None else [])


def _undecoded(ds: Any, columns: tuple[str, ...] | list[str]) -> Any:
    """Image-feature columns switched to ``decode=False`` (``{"bytes", "path"}`` dicts): decoding happens in
    :class:`PreferencePairs`, where a corrupt image becomes a :class:`SkippedRow` instead of an exception."""
    for col in columns:
        feature = ds.features[col] if ds.features is not None else None
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _score_gap_reason(scores: list[Any], min_gap: float) -> str | None:
    """``missing_score`` / ``small_score_gap`` when the two rewards are absent or closer than ``min_gap``."""
    try:
        gap = abs(float(scores[0]) - float(scores[1]))
    except (TypeError, ValueError):
        return "missing_score"
    return None if gap >= min_gap else "small_score_gap"


def _preferred_first(row: Mapping[str, Any], cfg: DataConfig) -> bool | str:
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


def _pair_key(caption: str, digests: list[bytes]) -> int:
    """64 bits of sha1(caption, preferred digest, rejected digest): the duplicate key (JSON- and
    arrow-friendly; a collision among a billion rows has probability ~3e-2 · (n / 1e9)², i.e. none at
    Pick-a-Pic's size)."""
    h = hashlib.sha1(caption.encode("utf-8"))
    h.update(b"\0" + digests[0] + digests[1])
    return int.from_bytes(h.digest()[:8], "big", signed=True)


class _RowScanner:
    """The load-time checks of one row, shared by the map-style load and the stream. Picklable
    (``datasets.map`` runs it in worker processes with ``data.num_proc``); called on a batch it returns the
    per-row results."""

    def __init__(self, cfg: DataConfig, base: Path | None, column_names: list[str]) -> None:
        self.cfg, self.base = cfg, base
        ad = cfg.are_different_column
        self.are_different = ad if ad is not None and ad in column_names else None
        cols = [cfg.caption_column, *cfg.image_columns]
        cols += [cfg.label_column] if cfg.label_column is not None else []
        cols += list(cfg.score_columns) if cfg.min_score_gap is not None else []
        cols += [self.are_different] if self.are_different else []
        self.columns = list(dict.fromkeys(cols))  # what the checks (and the per-pair processing) read
        self.hashing = cfg.drop_duplicates or cfg.drop_identical_images

    def check(self, row: Mapping[str, Any]) -> tuple[str | None, list[str], int | None]:
        """``(skip reason or None, image conversions, duplicate key or None)``. Checks, first failing one
        wins: score gap, label (``bad_label``, ``tie``), ``not_different``, ``missing_caption``, the images'
        headers (``missing_image``, ``missing_image_file``, ``undecodable_image``), then with hashing
        ``identical_images``. Header-only image check: ``Image.open`` + ``.size``."""
        cfg = self.cfg
        if cfg.min_score_gap is not None:
            reason = _score_gap_reason([row[c] for c in cfg.score_columns], cfg.min_score_gap)
            if reason:
                return reason, [], None
        first = _preferred_first(row, cfg)
        if isinstance(first, str):
            return first, [], None
        if self.are_different and row[self.are_different] is not None and not row[self.are_different]:
            return "not_different", [], None
        caption = row[cfg.caption_column]
        if not isinstance(caption, str):
            return "missing_caption", [], None
        pair = [row[c] for c in cfg.image_columns]
        pair = pair if first else pair[::-1]
        conversions: list[str] = []
        for value in pair:
            try:
                img = _open_image(value, self.base)
                conversions += _conversions(img, cfg.resolution)  # mode and size come from the header
                if img is not value:
                    img.close()
            except _Unusable as exc:
                return exc.reason, [], None
            except Exception:  # any failure to read the header means "not an image"
                return "undecodable_image", [], None
        if not self.hashing:
            return None, conversions, None
        try:
            digests = [_image_digest(value, self.base) for value in pair]
        except Exception:  # the file went away or cannot be read
            return "undecodable_image", [], None
        if cfg.drop_identical_images and digests[0] == digests[1]:
            return "identical_images", [], None
        return None, conversions, _pair_key(caption, digests) if cfg.drop_duplicates else None

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


class _Admission:
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
    def from_state(cls, state: Mapping[str, Any]) -> _Admission:
        new = cls()
        new.scanned, new.kept = int(state["scanned"]), int(state["kept"])
        new.counter.skipped.update(state["skipped"])
        new.counter.converted.update(state["converted"])
        new.seen = set(np.frombuffer(base64.b64decode(state["seen"]), dtype=np.int64).tolist())
        return new


def _scan(table: datasets.Dataset, scanner: _RowScanner, num_proc: int | None) -> Iterator[tuple]:
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


def _check_supported(cfg: DataConfig) -> None:
    if not cfg.drop_ties:
        raise ValueError("data.drop_ties=false is not supported: a tie has no preferred image; set "
                         "data.drop_ties=true")


def _open_checked(cfg: DataConfig, streaming: bool) -> tuple[Any, Path | None, _RowScanner]:
    """Open the source, map its layout into the Pick-a-Pic schema, check the columns; returns the source (only
    the columns the checks read, images undecoded), the image base folder and the row checks."""
    _check_supported(cfg)
    source, base = _open_source(cfg, streaming)
    source, names = _map_pair_columns(source, _column_names(source), cfg)
    _check_columns(names, cfg, cfg.dataset)
    _check_optional_columns(names, cfg)
    return _undecoded(source, cfg.image_columns), base, _RowScanner(cfg, base, names)


def _resolved_path(value: Any, base: Path | None) -> Any:
    found = _find_file(value, base) if isinstance(value, str) and value.strip() else None
    return str(found.absolute()) if found is not None else value


def load_preference_dataset(cfg: DataConfig) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Load Pick-a-Pic-schema rows; return ``(dataset of kept rows, report)``.

    ``cfg.dataset`` may be:

    - a hub id (``load_dataset(id, split=cfg.split)``; offline, it needs the data in the datasets cache);
    - a local .parquet/.arrow/.json/.jsonl/.csv file, or a glob of them (``/data/pickapic/train-*.parquet``);
    - a folder of such files (all of them, recursively, hidden ones excepted; when every file is a hub-style
      shard ``SPLIT-00000-of-NNNNN…``, as in a downloaded snapshot, only those of ``cfg.split``);
    - a ``Dataset.save_to_disk`` folder (a saved DatasetDict is indexed by ``cfg.split``);
    - a folder with ``w/`` and ``l/`` subfolders of images and a ``metadata.jsonl`` (:func:`_pair_folder`).

    Layouts mapped into the Pick-a-Pic schema: a table with ``preferred``/``rejected`` columns and none of the
    configured image columns (e.g. a CSV ``caption,preferred,rejected``: renamed, label 1.0); any table with
    ``data.label_column=null`` (the first image column is the preferred one). Image columns hold bytes,
    datasets images, or paths: relative paths (and Pick-a-Pic's uids, which name a file once a suffix such as
    ``.jpg`` is appended) are resolved against ``cfg.image_root``, else the data file's folder (or the given
    folder), and returned absolute. Image-feature columns are returned with ``decode=False`` so
    :class:`PreferencePairs` decodes them. Hub data needs ``cfg.image_root`` for path columns
    (``pickapic_v2_no_images``: ``image_columns=[image_0_uid, image_1_uid]``).

    Rows are skipped, counted by reason: ``bad_label`` (label not in {0, 0.5, 1}), ``tie`` (0.5),
    ``not_different`` (the ``cfg.are_different_column`` is false), ``missing_caption`` (None / not a string),
    ``missing_image`` (no value), ``missing_image_file`` (a path that names no file), ``undecodable_image``
    (header does not open); with ``cfg.min_score_gap``: ``missing_score``, ``small_score_gap`` (``|score_0 -
    score_1| < min_score_gap``); with ``cfg.drop_identical_images``: ``identical_images`` (the two images'
    bytes are equal); with ``cfg.drop_duplicates``: ``duplicate`` (same caption, preferred and rejected image
    bytes as an earlier kept row; the same pair stored the other way round with the opposite label is a
    duplicate too). The hash filters read every image in full (sha1), which the header checks do not. Scanning
    stops once ``cfg.max_pairs`` rows are kept (the first N kept rows). With ``cfg.num_proc`` the checks run
    in that many processes (``datasets.map``), all rows, then the same in-order decisions.

    Returns:
        report: ``{"rows": total rows, "scanned": rows checked, "kept": n, "skipped": {reason: rows},
        "converted": {reason: images}}`` (see :class:`SkipCounter`).

    Raises:
        FileNotFoundError: the path does not exist / holds no data, ``cfg.image_root`` is not a folder, or the
            hub id cannot be loaded (offline: the message says how to use a local copy).
        ValueError: a required column is missing (names it, the available ones and the DataConfig field),
            ``cfg.drop_ties`` is False (unsupported), ``cfg.streaming`` is True (use :class:`StreamingPairs`),
            or no row survives the checks.
    """
    if cfg.streaming:
        raise ValueError("data.streaming=true reads the data as a stream: use lora_dpo.data.StreamingPairs "
                         "(load_preference_dataset loads the whole data set); or set data.streaming=false")
    raw, base, scanner = _open_checked(cfg, streaming=False)
    admission, kept = _Admission(), []
    for i, result in enumerate(_scan(raw.select_columns(scanner.columns), scanner, cfg.num_proc)):
        if len(kept) == cfg.max_pairs:
            break
        if admission.admit(*result):
            kept.append(i)
    report = {"rows": len(raw), **admission.report()}
    logger.info("data %s: %d rows, %d scanned, %d kept, skipped %s, converted %s", cfg.dataset, len(raw),
                report["scanned"], len(kept), report["skipped"], report["converted"])
    if not kept:
        hint = ""
        if report["skipped"].get("missing_image_file"):
            hint = (f". Image paths are resolved against data.image_root, else the data's folder "
                    f"({base if base is not None else 'the working directory'})")
        raise ValueError(f"no usable preference pairs in data.dataset='{cfg.dataset}': {report}{hint}")
    dataset = raw.select(kept)
    for col in cfg.image_columns:
        if dataset.features[col] in (datasets.Value("string"), datasets.Value("large_string")):
            dataset = dataset.map(lambda v, c=col: {c: _resolved_path(v, base)}, input_columns=col)
    return dataset, report


# ----------------------------------------------------------------------------------------------------------
# Per-pair processing


class PreferencePairs(torch.utils.data.Dataset):
    """Map-style dataset over kept rows; ``__getitem__(i)`` -> example dict, or :class:`SkippedRow` when the
    row's images fail to decode (never raises for bad image data).

    Example: ``pixel_values`` (2, 3, R, R) float32 in [-1, 1], preferred first; ``caption`` str;
    ``original_size`` (2, 2) long ``[[h_w, w_w], [h_l, w_l]]`` before resizing; ``crop_top_left`` (2, 2) long
    ``[[top_w, left_w], [top_l, left_l]]`` in resized coordinates (SDXL micro-conditioning); ``index`` int.

    One draw per pair from ``np.random.default_rng((salt, seed, epoch, index))``: crop fractions fy, fx (each
    image cropped at ``top = round(fy * (h_i - R))``, ``left = round(fx * (w_i - R))``; center crop
    ``(h_i - R) // 2`` when ``random_crop`` is off), a horizontal flip (p=0.5, both images; ``crop_top_left``
    is kept as computed before the flip) and a caption dropout (-> ``""``). All four are drawn whatever the
    options, so results depend only on (seed, epoch, index), not on DataLoader workers: resume is exact.
    """

    def __init__(self, hf_dataset: datasets.Dataset, cfg: DataConfig, seed: int) -> None:
        _check_columns(list(hf_dataset.column_names), cfg, "hf_dataset")
        self.cfg, self.seed, self.epoch = cfg, seed, 0
        columns = [cfg.caption_column, *cfg.image_columns] + ([cfg.label_column] if cfg.label_column else [])
        self.dataset = _undecoded(hf_dataset.select_columns(columns), cfg.image_columns)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        index = int(index)
        return _make_example(self.dataset[index], self.cfg, self.seed, self.epoch, index)


def _make_example(row: Mapping[str, Any], cfg: DataConfig, seed: int, epoch: int, index: int,
                  base: Path | None = None) -> dict[str, Any] | SkippedRow:
    """One row -> the example of :class:`PreferencePairs` (its docstring gives the format and the draws), or a
    :class:`SkippedRow`. ``index`` keys the per-pair draw; ``base`` resolves relative image paths."""
    res = cfg.resolution
    caption = row[cfg.caption_column]
    if not isinstance(caption, str):
        return SkippedRow("missing_caption", index)
    rng = np.random.default_rng([_ITEM_SALT, seed % 2**64, epoch, index])
    fy, fx, flip_u, drop_u = rng.random(4)
    first = _preferred_first(row, cfg)  # label_0 == 1: jpg_0 preferred
    if isinstance(first, str):
        return SkippedRow(first, index)
    pair = [row[c] for c in cfg.image_columns]
    pair = pair if first else pair[::-1]
    images = []
    try:
        for value in pair:
            img = _open_image(value, base)
            img.load()
            images.append(_to_rgb(img))
    except _Unusable as exc:
        return SkippedRow(exc.reason, index)
    except Exception:  # truncated / corrupt data of any kind skips the row
        return SkippedRow("undecodable_image", index)
    pixels, original, crops = [], [], []
    for img in images:
        original.append((img.height, img.width))
        img = _resize_short_side(img, res)
        if cfg.random_crop:
            top, left = round(fy * (img.height - res)), round(fx * (img.width - res))
        else:
            top, left = (img.height - res) // 2, (img.width - res) // 2
        crops.append((top, left))
        arr = np.array(img.crop((left, top, left + res, top + res)), dtype=np.uint8)
        pixels.append(torch.from_numpy(arr).permute(2, 0, 1))
    pixel_values = torch.stack(pixels).float().div_(127.5).sub_(1.0)
    if cfg.random_flip and flip_u < 0.5:
        pixel_values = pixel_values.flip(-1)
    return {
        "pixel_values": pixel_values,
        "caption": "" if drop_u < cfg.caption_dropout else caption,
        "original_size": torch.tensor(original, dtype=torch.long),
        "crop_top_left": torch.tensor(crops, dtype=torch.long),
        "index": index,
    }


@dataclass
class PairBatch:
    """A micro-batch of B preference pairs; image-level tensors hold 2B rows, ALL preferred images first.

    pixel_values: (2B, 3, R, R) float32 in [-1, 1]; rows 0..B-1 are x_w of pairs 0..B-1, rows B..2B-1 are
        x_l of the same pairs in the same order (so ``chunk(2)`` gives (x_w, x_l)).
    captions: list[str], length B (one per pair; the text encoder output is repeated for both halves).
    original_size, crop_top_left, target_size: (2B, 2) long, same row order as pixel_values; target_size is
        (R, R) everywhere. Together they are SDXL's ``add_time_ids``.
    indices: list[int], length B, row indices in the hf dataset.
    num_skipped / skipped: rows of this batch dropped (undecodable images), total and by reason.
    When every row was skipped the batch is empty: num_pairs == 0, pixel_values of shape (0, 3, 0, 0).
    """

    pixel_values: torch.Tensor
    captions: list[str]
    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    target_size: torch.Tensor
    indices: list[int]
    num_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """A copy with every tensor on ``device``."""
        move = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("pixel_values", "original_size", "crop_top_left", "target_size")
        }
        return replace(self, **move)


def collate_pairs(examples: list[dict[str, Any] | SkippedRow]) -> PairBatch:
    """Drop :class:`SkippedRow` markers (counted in ``num_skipped`` / ``skipped``) and stack the rest into a
    :class:`PairBatch` (preferred images of all pairs first, then the rejected ones). Never returns None: if
    every row was bad the batch has ``num_pairs == 0`` and the training loop should skip it."""
    skipped = Counter(e.reason for e in examples if isinstance(e, SkippedRow))
    good = [e for e in examples if not isinstance(e, SkippedRow)]
    extra = {"num_skipped": sum(skipped.values()), "skipped": dict(skipped)}
    if not good:
        empty = torch.zeros(0, 2, dtype=torch.long)
        return PairBatch(torch.zeros(0, 3, 0, 0), [], empty, empty.clone(), empty.clone(), [], **extra)

    def winners_then_losers(key: str) -> torch.Tensor:
        stacked = torch.stack([e[key] for e in good])  # (B, 2, ...)
        return torch.cat([stacked[:, 0], stacked[:, 1]])  # (2B, ...)

    pixel_values = winners_then_losers("pixel_values")
    res = pixel_values.shape[-1]
    return PairBatch(
        pixel_values=pixel_values,
        captions=[e["caption"] for e in good],
        original_size=winners_then_losers("original_size"),
        crop_top_left=winners_then_losers("crop_top_left"),
        target_size=torch.full((pixel_values.shape[0], 2), res, dtype=torch.long),
        indices=[e["index"] for e in good],
        **extra,
    )


# ----------------------------------------------------------------------------------------------------------
# Order and loading


class PairSampler(torch.utils.data.Sampler[int]):
    """Deterministic, resumable, sharded order over ``range(num_rows)``.

    Epoch e is the permutation drawn from ``(seed, e)`` (identical on every rank; ``arange`` when
    ``shuffle=False``), padded by wrapping around to a multiple of ``num_replicas``; rank r takes positions
    ``r::num_replicas``, so shards are disjoint up to the padding. ``start_at(k)`` makes the NEXT ``__iter__``
    skip the first k indices of this rank's shard (resume), once. ``__len__`` is what the next ``__iter__``
    yields: ``ceil(num_rows / num_replicas)`` minus a pending ``start_at`` (``num_samples`` is the full count).
    """

    def __init__(self, num_rows: int, seed: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.num_rows, self.seed, self.num_replicas, self.rank, self.shuffle = num_rows, seed, num_replicas, rank, shuffle
        self.num_samples = math.ceil(num_rows / num_replicas)
        self.epoch, self._start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"start_at({k}): k must be >= 0")
        self._start = k

    def shard(self) -> list[int]:
        """This rank's full index list for the current epoch (no start_at applied)."""
        if self.shuffle:
            order = np.random.default_rng([_SAMPLER_SALT, self.seed % 2**64, self.epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        total = self.num_samples * self.num_replicas
        if self.num_rows:
            order = np.resize(order, total)  # repeats from the start: wrap-around padding
        return order[self.rank :: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.shard()[start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self._start)


def build_dataloader(hf_dataset: datasets.Dataset, cfg: DataConfig, batch_size: int, seed: int,
                     num_replicas: int = 1, rank: int = 0, epoch: int = 0,
                     start_batch: int = 0) -> torch.utils.data.DataLoader:
    """One epoch's DataLoader of :class:`PairBatch` (PreferencePairs + PairSampler, both at ``epoch``), skipping
    the first ``start_batch`` micro-batches of this rank (resume). ``drop_last=True``: every micro-batch has
    ``batch_size`` rows before undecodable ones are dropped. Rebuild it for each epoch.

    ``hf_dataset`` may also be a ready pairs dataset with ``set_epoch`` and a ``collate`` function (the latent
    cache's :class:`lora_dpo.cache.CachedPairs`): it is then used as it is, with the same sampler.

    Raises:
        ValueError: this rank's shard holds fewer than ``batch_size`` pairs (the epoch would be empty).
    """
    pairs = hf_dataset if hasattr(hf_dataset, "collate") else PreferencePairs(hf_dataset, cfg, seed)
    pairs.set_epoch(epoch)
    sampler = PairSampler(len(pairs), seed, num_replicas=num_replicas, rank=rank, shuffle=True)
    if sampler.num_samples < batch_size:
        raise ValueError(
            f"{len(pairs)} pairs over {num_replicas} process(es) give {sampler.num_samples} per process, fewer "
            f"than train.batch_size={batch_size}; lower train.batch_size or add data"
        )
    sampler.set_epoch(epoch)
    sampler.start_at(start_batch * batch_size)
    return torch.utils.data.DataLoader(
        pairs, batch_size=batch_size, sampler=sampler, collate_fn=getattr(pairs, "collate", collate_pairs),
        num_workers=cfg.num_workers, drop_last=True, persistent_workers=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Streaming


class StreamingPairs:
    """Pairs streamed from a data set that need not fit on disk (``data.streaming: true``): this process's
    share, checked, oriented and processed on the fly, with a resumable position.

    The source is ``cfg.dataset`` opened as :func:`load_preference_dataset` opens it, but with
    ``load_dataset(..., streaming=True)`` (a save_to_disk or ``w/`` + ``l/`` folder via
    ``to_iterable_dataset``), reduced to the columns the checks read, shuffled when ``cfg.shuffle_buffer`` > 0
    (``IterableDataset.shuffle`` seeded by ``seed``: shard order and a buffer of rows) and split by
    ``split_dataset_by_node`` (whole shards per process when their number is a multiple of ``num_replicas``,
    else every ``num_replicas``-th row): the shares are disjoint. Each row gets the checks of
    :func:`load_preference_dataset` (same reasons; ``duplicate`` among this process's rows of the current
    epoch), then the processing of :class:`PreferencePairs`: the same example dicts, or :class:`SkippedRow`
    for images that fail to decode. The per-pair draw is keyed by ``index = k * num_replicas + rank`` for this
    process's k-th kept row of the epoch, so with one process and ``shuffle_buffer=0`` the pairs and draws are
    those of the map-style path. ``cfg.max_pairs`` caps each process's kept rows per epoch at
    ``ceil(max_pairs / num_replicas)``. Iterating the object runs the rest of the current epoch; when the
    epoch ends, the next iteration starts the next one.

    What a training loop must call (decoding runs in the calling process; ``data.num_workers`` is not used)::

        stream = StreamingPairs(cfg.data, seed=cfg.train.seed, num_replicas=world, rank=rank)
        if "stream" in data_state:                        # resuming: the dict saved below
            stream.load_state_dict(data_state["stream"])
        batches = stream.batches(cfg.train.batch_size)    # endless PairBatch iterator, epoch after epoch
        batch = next(batches)     # as with the map-style loader: skip num_pairs == 0, add up batch.skipped
        ...                       # at a checkpoint (JSON-ready, exact after any batch):
        trainer_state["stream"] = stream.state_dict()
        ...                       # at the end: the counts of every process
        data_report = merge_reports(accelerator.gather_object([stream.report()]))

    ``stream.epoch`` is the epoch. ``len(dataset)`` is unknown: the batch-size check happens on the first pass
    (``batches`` raises when a whole pass gives this process fewer pairs than a batch). Resuming needs the
    same data, ``num_replicas``, ``rank``, ``seed`` and ``shuffle_buffer``; rows held in the shuffle buffer at
    the checkpoint are lost for that epoch (datasets' documented limit; ``shuffle_buffer=0`` resumes exactly).

    Raises (on construction): as :func:`load_preference_dataset` for the source and its columns; ValueError
    for a rank outside ``[0, num_replicas)``.
    """

    def __init__(self, cfg: DataConfig, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        source, self.base, self._scanner = _open_checked(cfg, streaming=True)
        source = source.select_columns(self._scanner.columns)
        if cfg.shuffle_buffer:
            source = source.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
        self.source = split_dataset_by_node(source, rank=rank, world_size=num_replicas)
        self.cfg, self.seed, self.num_replicas, self.rank = cfg, seed, num_replicas, rank
        self._limit = math.ceil(cfg.max_pairs / num_replicas) if cfg.max_pairs else None
        self.epoch, self._admission, self._first_pass = 0, _Admission(), None

    def _done(self) -> bool:
        return self._limit is not None and self._admission.kept >= self._limit

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedRow]:
        epoch = self.epoch
        self.source.set_epoch(epoch)  # datasets reshuffles per epoch and resumes only within the saved one
        if not self._done():
            for row in self.source:
                if not self._admission.admit(*self._scanner.check(row)):
                    continue
                index = (self._admission.kept - 1) * self.num_replicas + self.rank
                yield _make_example(row, self.cfg, self.seed, epoch, index, self.base)
                if self._done():
                    break
        if epoch == 0:  # the first pass saw every row of this share: its counts are the report
            self._first_pass = self._admission.report()
        self.epoch, self._admission = epoch + 1, _Admission()

    def batches(self, batch_size: int) -> Iterator[PairBatch]:
        """Endless :class:`PairBatch` es of ``batch_size`` rows (before undecodable ones are dropped, as
        :func:`build_dataloader` does), epoch after epoch; an epoch's last incomplete batch is dropped.

        Raises:
            ValueError: a whole pass gives this process fewer than ``batch_size`` pairs.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        while True:
            fresh, produced, examples = self._admission.scanned == 0, 0, []
            for example in self:
                produced += 1
                examples.append(example)
                if len(examples) == batch_size:
                    yield collate_pairs(examples)
                    examples = []
            if fresh and produced < batch_size:
                raise ValueError(
                    f"a whole pass over data.dataset='{self.cfg.dataset}' gave process {self.rank} of "
                    f"{self.num_replicas} {produced} pairs, fewer than train.batch_size={batch_size}; lower "
                    f"train.batch_size or add data (counts: {self.report()})"
                )

    def report(self) -> dict[str, Any]:
        """This process's counts, as :func:`load_preference_dataset` reports them (``rows`` = rows read), over
        the first pass (``complete``: it ended), or over what the first pass has read so far."""
        counts = self._first_pass if self._first_pass is not None else self._admission.report()
        return {"rows": counts["scanned"], **counts, "complete": self._first_pass is not None}

    def state_dict(self) -> dict[str, Any]:
        """The position (JSON-ready): the source's ``IterableDataset.state_dict()`` (just past the last row
        yielded), the epoch, this epoch's counts and duplicate keys (``data.drop_duplicates``: 8 bytes per
        kept row, base64), the first pass's counts."""
        return {
            "epoch": self.epoch, "source": self.source.state_dict(),
            "admission": self._admission.state_dict(), "first_pass": self._first_pass, **self._identity(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s position (the next iteration starts there).

        Raises:
            ValueError: the state was saved by a stream of another rank, process count, seed or shuffle
            buffer.
        """
        saved = {key: state.get(key) for key in self._identity()}
        if saved != self._identity():
            raise ValueError(f"the stream position was saved with {saved}, this stream has "
                             f"{self._identity()}: resume with the same number of processes, train.seed and "
                             f"data.shuffle_buffer")
        self.epoch = int(state["epoch"])
        self._admission = _Admission.from_state(state["admission"])
        self._first_pass = state.get("first_pass")
        self.source.load_state_dict(state["source"])

    def _identity(self) -> dict[str, int]:
        return {"rank": self.rank, "num_replicas": self.num_replicas, "seed": self.seed,
                "shuffle_buffer": self.cfg.shuffle_buffer}


def merge_reports(reports: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The data report of a streamed run: the sum of the processes' :meth:`StreamingPairs.report` (disjoint
    shares): counts added, ``skipped`` / ``converted`` added by reason, ``complete`` when every one is, and
    ``processes``."""
    merged: dict[str, Any] = {"rows": 0, "scanned": 0, "kept": 0}
    skipped, converted = Counter(), Counter()
    for report in reports:
        for key in ("rows", "scanned", "kept"):
            merged[key] += int(report.get(key) or 0)
        skipped.update(report.get("skipped", {}))
        converted.update(report.get("converted", {}))
    merged.update(skipped=dict(sorted(skipped.items())), converted=dict(sorted(converted.items())))
    if any("complete" in report for report in reports):
        merged["complete"] = all(report.get("complete", True) for report in reports)
    merged["processes"] = len(reports)
    return merged
