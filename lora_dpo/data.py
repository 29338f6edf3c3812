"""Preference pairs in the Pick-a-Pic schema -> oriented, cropped, batched image pairs for Diffusion-DPO.

Source: Wallace et al. 2023 (arXiv 2311.12908), §5: each row holds a caption, two images (``jpg_0``, ``jpg_1``)
and ``label_0`` (1: ``jpg_0`` preferred, 0: ``jpg_1`` preferred, 0.5: tie). Ties carry no preference and are
dropped. Everywhere below the PREFERRED image (x_w) comes first and the rejected one (x_l) second.

Flow: :func:`load_preference_dataset` (cheap checks, counted by reason) -> :class:`PreferencePairs`
(decode, orient, RGB, resize, one crop/flip/caption-dropout draw per pair) -> :class:`PairSampler`
(deterministic, resumable, sharded order) -> :func:`collate_pairs` -> :class:`PairBatch`.
"""

from __future__ import annotations

import difflib
import io
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from lora_dpo.config import DataConfig

logger = logging.getLogger(__name__)

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}
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


def _open_image(value: Any, base: Path | None = None) -> Image.Image | None:
    """Open lazily (header only) an image given as bytes, a datasets ``{"bytes", "path"}`` dict, a PIL image
    or a path (relative paths resolved against ``base``). Returns None when there is no image; raises
    (OSError, ...) when the data is not an image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(value))) if len(value) else None
    if isinstance(value, str):
        path = Path(value)
        path = base / path if base is not None and not path.is_absolute() else path
        return Image.open(path) if value and path.is_file() else None
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


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


def _check_columns(column_names: list[str], cfg: DataConfig, source: str) -> None:
    """Raise ValueError naming each missing column, the available ones and the DataConfig field to set."""
    wanted = [
        (cfg.caption_column, "data.caption_column"),
        (cfg.image_columns[0], "data.image_columns"),
        (cfg.image_columns[1], "data.image_columns"),
        (cfg.label_column, "data.label_column"),
    ]
    missing = [(col, key) for col, key in wanted if col not in column_names]
    if missing:
        hints = []
        for col, key in missing:
            close = difflib.get_close_matches(col, column_names, n=1, cutoff=0.0)
            hints.append(f"column '{col}' (set {key}{', e.g. to ' + repr(close[0]) if close else ''})")
        raise ValueError(
            f"dataset '{source}' lacks {'; '.join(hints)}. Available columns: {', '.join(column_names)}."
        )


def _load_raw(cfg: DataConfig) -> tuple[datasets.Dataset, Path | None]:
    """Open ``cfg.dataset`` (hub id, file, folder of files or save_to_disk folder). Returns the dataset and the
    folder that relative image paths are resolved against (None for hub datasets)."""
    name = cfg.dataset
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.suffix in _BUILDERS
    if not path.exists():
        if looks_local or name.count("/") > 1:
            raise FileNotFoundError(
                f"data.dataset='{name}' does not exist. Set data.dataset to a .parquet/.arrow/.json/.jsonl file, "
                f"a folder of such files, a Dataset.save_to_disk folder, or a hub id such as yuvalkirstain/pickapic_v2"
            )
        try:
            loaded = datasets.load_dataset(name, split=cfg.split, cache_dir=cfg.cache_dir)
        except (FileNotFoundError, ConnectionError) as exc:
            raise FileNotFoundError(
                f"data.dataset='{name}' is not a local path and could not be loaded from the hub ({exc}). "
                f"Check the id and the network (or HF_DATASETS_OFFLINE with a filled cache), or set data.dataset "
                f"to a local file or folder"
            ) from exc
        return loaded, None
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise ValueError(f"'{name}' has splits {list(loaded)}, not data.split='{cfg.split}'")
            loaded = loaded[cfg.split]
        return loaded, path
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.suffix in _BUILDERS and p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders:
        raise FileNotFoundError(
            f"data.dataset='{name}' holds no .parquet/.arrow/.json/.jsonl data; point data.dataset at such a "
            f"file, a folder of them, or a Dataset.save_to_disk folder"
        )
    if len(builders) > 1:
        raise ValueError(f"'{name}' mixes file types ({sorted(builders)}); point data.dataset at one kind")
    loaded = datasets.load_dataset(
        builders.pop(), data_files=[str(p) for p in files], split="train", cache_dir=cfg.cache_dir
    )
    return loaded, path if path.is_dir() else path.parent


def _undecoded(ds: datasets.Dataset, columns: tuple[str, ...] | list[str]) -> datasets.Dataset:
    """Image-feature columns switched to ``decode=False`` (``{"bytes", "path"}`` dicts): decoding happens in
    :class:`PreferencePairs`, where a corrupt image becomes a :class:`SkippedRow` instead of an exception."""
    for col in columns:
        if isinstance(ds.features[col], datasets.Image) and ds.features[col].decode:
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _row_reason(caption: Any, label: Any, images: tuple[Any, Any], base: Path | None, cfg: DataConfig,
                counter: SkipCounter) -> str | None:
    """Why a row is skipped (None when kept). Header-only image check: ``Image.open`` + ``.size``."""
    try:
        label = float(label)
    except (TypeError, ValueError):
        return "bad_label"
    if label == 0.5:
        return "tie"
    if label not in (0.0, 1.0):
        return "bad_label"
    if not isinstance(caption, str):
        return "missing_caption"
    conversions = []
    for value in images:
        try:
            img = _open_image(value, base)
            if img is None:
                return "missing_image"
            conversions += _conversions(img, cfg.resolution)  # mode and size come from the header
            if img is not value:
                img.close()
        except Exception:  # any failure to read the header means "not an image"
            return "undecodable_image"
    for reason in conversions:
        counter.convert(reason)
    return None


def _score_gap_reason(scores: list[Any], min_gap: float) -> str | None:
    """``missing_score`` / ``small_score_gap`` when the two rewards are absent or closer than ``min_gap``."""
    try:
        gap = abs(float(scores[0]) - float(scores[1]))
    except (TypeError, ValueError):
        return "missing_score"
    return None if gap >= min_gap else "small_score_gap"


def load_preference_dataset(cfg: DataConfig) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Load Pick-a-Pic-schema rows; return ``(dataset of kept rows, report)``.

    ``cfg.dataset`` may be a hub id (``load_dataset(id, split=cfg.split)``), a local .parquet/.arrow/.json/.jsonl
    file, a folder of such files (all of them, recursively, hidden ones excepted; ``cfg.split`` ignored), or a
    ``Dataset.save_to_disk`` folder (a saved DatasetDict is indexed by ``cfg.split``). String image columns are
    file paths; relative ones are resolved against the data file's folder (or the given folder) and returned
    absolute. Image-feature columns are returned with ``decode=False`` so :class:`PreferencePairs` decodes them.

    Rows are skipped, counted by reason: ``bad_label`` (label not in {0, 0.5, 1}), ``tie`` (0.5),
    ``missing_caption`` (None / not a string), ``missing_image``, ``undecodable_image`` (header does not open),
    and with ``cfg.min_score_gap``: ``missing_score``, ``small_score_gap`` (``|score_0 - score_1| < min_score_gap``).
    Scanning stops once ``cfg.max_pairs`` rows are kept (the first N kept rows).

    Returns:
        report: ``{"rows": total rows, "scanned": rows checked, "kept": n, "skipped": {reason: rows},
        "converted": {reason: images}}`` (see :class:`SkipCounter`).

    Raises:
        FileNotFoundError: the path does not exist / holds no data, or the hub id cannot be loaded.
        ValueError: a required column is missing (names it, the available ones and the DataConfig field),
            ``cfg.drop_ties`` is False (unsupported), or no row survives the checks.
    """
    if not cfg.drop_ties:
        raise ValueError("data.drop_ties=false is not supported: a tie has no preferred image; set data.drop_ties=true")
    raw, base = _load_raw(cfg)
    _check_columns(list(raw.column_names), cfg, cfg.dataset)
    raw = _undecoded(raw, cfg.image_columns)
    cols = [cfg.caption_column, cfg.label_column, *cfg.image_columns]
    if cfg.min_score_gap is not None:
        missing = [c for c in cfg.score_columns if c not in raw.column_names]
        if missing:
            raise ValueError(
                f"data.min_score_gap needs score columns {missing} in '{cfg.dataset}' (set data.score_columns); "
                f"available columns: {', '.join(raw.column_names)}"
            )
        cols += list(cfg.score_columns)
    rows = (row for batch in raw.select_columns(cols).iter(batch_size=256) for row in zip(*batch.values()))
    counter, kept, scanned = SkipCounter(), [], 0
    for caption, label, img0, img1, *scores in rows:
        if len(kept) == cfg.max_pairs:
            break
        reason = _score_gap_reason(scores, cfg.min_score_gap) if scores else None
        reason = reason or _row_reason(caption, label, (img0, img1), base, cfg, counter)
        if reason is None:
            kept.append(scanned)
        else:
            counter.skip(reason)
        scanned += 1
    report = {"rows": len(raw), "scanned": scanned, "kept": len(kept), **counter.as_dict()}
    logger.info("data %s: %d rows, %d scanned, %d kept, skipped %s, converted %s", cfg.dataset, len(raw),
                scanned, len(kept), report["skipped"], report["converted"])
    if not kept:
        raise ValueError(f"no usable preference pairs in data.dataset='{cfg.dataset}': {report}")
    dataset = raw.select(kept)
    if base is not None:
        for col in cfg.image_columns:
            if dataset.features[col] == datasets.Value("string"):
                dataset = dataset.map(lambda v, c=col: {c: str(base / v) if not Path(v).is_absolute() else v},
                                      input_columns=col)
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
        columns = [cfg.caption_column, cfg.label_column, *cfg.image_columns]
        self.dataset = _undecoded(hf_dataset.select_columns(columns), cfg.image_columns)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        cfg, res, index = self.cfg, self.cfg.resolution, int(index)
        row = self.dataset[index]
        caption = row[cfg.caption_column]
        if not isinstance(caption, str):
            return SkippedRow("missing_caption", index)
        rng = np.random.default_rng([_ITEM_SALT, self.seed % 2**64, self.epoch, index])
        fy, fx, flip_u, drop_u = rng.random(4)
        try:
            label = float(row[cfg.label_column])
        except (TypeError, ValueError):
            return SkippedRow("bad_label", index)
        if label not in (0.0, 1.0):
            return SkippedRow("tie" if label == 0.5 else "bad_label", index)
        pair = [row[c] for c in cfg.image_columns]
        pair = pair if label == 1.0 else pair[::-1]  # label_0 == 1: jpg_0 preferred
        images = []
        try:
            for value in pair:
                img = _open_image(value)
                if img is None:
                    return SkippedRow("missing_image", index)
                img.load()
                images.append(_to_rgb(img))
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

    Raises:
        ValueError: this rank's shard holds fewer than ``batch_size`` pairs (the epoch would be empty).
    """
    pairs = PreferencePairs(hf_dataset, cfg, seed)
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
        pairs, batch_size=batch_size, sampler=sampler, collate_fn=collate_pairs,
        num_workers=cfg.num_workers, drop_last=True, persistent_workers=False,
    )
