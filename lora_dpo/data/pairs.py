"""One kept row -> one oriented, cropped example; examples -> a :class:`PairBatch`.

:class:`PairDataset` is the map-style dataset over the rows that
:func:`lora_dpo.data.sources.load_preference_dataset` kept; :func:`make_example` is its per-pair processing
(decode, orient, RGB, resize, one crop/flip/caption-dropout draw), shared with
:class:`lora_dpo.data.streaming.StreamedPairs`; :func:`collate_pairs` stacks examples into a :class:`PairBatch`,
preferred images first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field, fields, replace
from typing import Any

import datasets
import numpy as np
import torch

from lora_dpo.config import DataConfig
from lora_dpo.data.draws import TRAIN_SALT, draw_seed
from lora_dpo.data.filters import desirable, row_images
from lora_dpo.data.images import ImageBase, MissingImage, open_image, resize_short_side, to_rgb
from lora_dpo.data.sources import check_columns, undecoded

# Salt of the per-item random stream (apart from the sampler's, lora_dpo.data.loader._SAMPLER_SALT).
ITEM_SALT = 0x17E4


@dataclass(frozen=True)
class SkippedRow:
    """Marker returned by :meth:`PairDataset.__getitem__` for a row that cannot be used."""

    reason: str
    index: int = -1


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over kept rows; ``__getitem__(i)`` -> example dict, or :class:`SkippedRow` when the
    row's images fail to decode (never raises for bad image data).

    Example: ``pixel_values`` (2, 3, R, R) float32 in [-1, 1], preferred first; ``caption`` str;
    ``original_size`` (2, 2) long ``[[h_w, w_w], [h_l, w_l]]`` before resizing; ``crop_top_left`` (2, 2) long
    ``[[top_w, left_w], [top_l, left_l]]`` in resized coordinates (SDXL micro-conditioning); ``index`` int;
    ``draw_seed`` int, the seed of the pair's posterior samples, noise and timestep in this epoch
    (:mod:`lora_dpo.data.draws`).

    One draw per pair from ``np.random.default_rng((salt, seed, epoch, index))``: crop fractions fy, fx (each
    image cropped at ``top = round(fy * (h_i - R))``, ``left = round(fx * (w_i - R))``; center crop
    ``(h_i - R) // 2`` when ``random_crop`` is off), a horizontal flip (p=0.5, both images; ``crop_top_left``
    is kept as computed before the flip) and a caption dropout (-> ``""``). All four are drawn whatever the
    options, so results depend only on (seed, epoch, index), not on DataLoader workers: resume is exact.
    """

    def __init__(self, hf_dataset: datasets.Dataset, cfg: DataConfig, seed: int) -> None:
        check_columns(list(hf_dataset.column_names), cfg, "hf_dataset")
        self.cfg, self.seed, self.epoch = cfg, seed, 0
        columns = [cfg.caption_column, *cfg.image_columns] + ([cfg.label_column] if cfg.label_column else [])
        self.dataset = undecoded(hf_dataset.select_columns(columns), cfg.image_columns)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        index = int(index)
        return make_example(self.dataset[index], self.cfg, self.seed, self.epoch, index)


def make_example(row: Mapping[str, Any], cfg: DataConfig, seed: int, epoch: int, index: int,
                  base: ImageBase | None = None) -> dict[str, Any] | SkippedRow:
    """One row -> the example of :class:`PairDataset` (its docstring gives the format and the draws), or a
    :class:`SkippedRow`. ``index`` keys the per-pair draw; ``base`` resolves relative image paths
    (a confined one refuses paths outside it: ``image_outside_root``).

    An unpaired row (``cfg.unpaired``, :class:`lora_dpo.data.unpaired.LabeledImages`) gives the same keys for its one
    image (``pixel_values`` ``(1, 3, R, R)``, ``original_size`` and ``crop_top_left`` ``(1, 2)``) plus ``desirable``
    (bool)."""
    res = cfg.resolution
    caption = row[cfg.caption_column]
    if not isinstance(caption, str):
        return SkippedRow("missing_caption", index)
    rng = np.random.default_rng([ITEM_SALT, seed % 2**64, epoch, index])
    fy, fx, flip_u, drop_u = rng.random(4)
    values = row_images(row, cfg)  # preferred first; an unpaired row: its one image
    if isinstance(values, str):
        return SkippedRow(values, index)
    images = []
    try:
        for value in values:
            img = open_image(value, base)
            img.load()
            images.append(to_rgb(img))
    except MissingImage as exc:
        return SkippedRow(exc.reason, index)
    except Exception:  # truncated / corrupt data of any kind skips the row
        return SkippedRow("undecodable_image", index)
    pixels, original, crops = [], [], []
    for img in images:
        original.append((img.height, img.width))
        img = resize_short_side(img, res)
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
    example = {
        "pixel_values": pixel_values,
        "caption": "" if drop_u < cfg.caption_dropout else caption,
        "original_size": torch.tensor(original, dtype=torch.long),
        "crop_top_left": torch.tensor(crops, dtype=torch.long),
        "index": index,
        "draw_seed": draw_seed(TRAIN_SALT, seed, epoch, index),
    }
    if cfg.unpaired:
        example["desirable"] = desirable(row, cfg)
    return example


@dataclass
class ExampleBatch:
    """What every micro-batch type carries besides its images or latents (:class:`PairBatch`,
    :class:`lora_dpo.data.unpaired.ImageBatch`, :class:`lora_dpo.data.cache.CachedBatch`): SDXL's per-image
    micro-conditioning and the bookkeeping of its examples (pairs or labeled images). Subclasses add their own
    fields after these; build them with keyword arguments.

    original_size, crop_top_left, target_size: (images, 2) long, one row per image in the batch's image order;
        together SDXL's ``add_time_ids`` (Podell et al. 2023, §2.2); target_size is (R, R) everywhere.
    indices: list[int], one per example: its row index in the data set.
    draw_seeds: list[int], one per example: its seed for :func:`lora_dpo.data.draws.pair_draws` (keyed by
        (seed, epoch, index), so the same whichever process holds the example).
    num_skipped / skipped (keyword-only): examples of this batch dropped (undecodable images), total and by reason.
        When every example was skipped the batch is empty: ``len(batch) == 0``.
    """

    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    target_size: torch.Tensor
    indices: list[int]
    draw_seeds: list[int]
    _: KW_ONLY
    num_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str, non_blocking: bool = False):
        """A copy with every tensor on ``device``, also those in a dict of tensors (a cached batch's text)."""
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=non_blocking)
            return {k: move(v) for k, v in value.items()} if isinstance(value, dict) else value

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


@dataclass
class PairBatch(ExampleBatch):
    """A micro-batch of B preference pairs; image-level tensors hold 2B rows, ALL preferred images first.

    pixel_values: (2B, 3, R, R) float32 in [-1, 1]; rows 0..B-1 are x_w of pairs 0..B-1, rows B..2B-1 are
        x_l of the same pairs in the same order (so ``chunk(2)`` gives (x_w, x_l)).
    captions: list[str], length B (one per pair; the text encoder output is repeated for both halves).
    The fields of :class:`ExampleBatch`: (2B, 2) conditioning rows in pixel_values' order; B indices and seeds.
    An empty batch has pixel_values of shape (0, 3, 0, 0).
    """

    pixel_values: torch.Tensor
    captions: list[str]

    @property
    def num_pairs(self) -> int:
        return len(self.captions)


def split_skipped(examples: list) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The usable examples of a batch, and ``{"num_skipped", "skipped"}`` counting its :class:`SkippedRow` markers
    by reason (the keyword arguments every batch type takes)."""
    skipped = Counter(e.reason for e in examples if isinstance(e, SkippedRow))
    good = [e for e in examples if not isinstance(e, SkippedRow)]
    return good, {"num_skipped": sum(skipped.values()), "skipped": dict(skipped)}


def preferred_then_rejected(good: list[dict[str, Any]], key: str) -> torch.Tensor:
    """Stack the per-pair ``(2, ...)`` tensors under ``key`` into ``(2B, ...)``: all preferred rows, then all rejected."""
    stacked = torch.stack([e[key] for e in good])  # (B, 2, ...)
    return torch.cat([stacked[:, 0], stacked[:, 1]])


def collate_pairs(examples: list[dict[str, Any] | SkippedRow]) -> PairBatch:
    """Drop :class:`SkippedRow` markers (counted in ``num_skipped`` / ``skipped``) and stack the rest into a
    :class:`PairBatch` (preferred images of all pairs first, then the rejected ones). Never returns None: if
    every row was bad the batch has ``num_pairs == 0`` and the training loop should skip it."""
    good, extra = split_skipped(examples)
    if not good:
        empty = torch.zeros(0, 2, dtype=torch.long)
        return PairBatch(pixel_values=torch.zeros(0, 3, 0, 0), captions=[], original_size=empty,
                         crop_top_left=empty.clone(), target_size=empty.clone(), indices=[], draw_seeds=[], **extra)

    pixel_values = preferred_then_rejected(good, "pixel_values")
    res = pixel_values.shape[-1]
    return PairBatch(
        pixel_values=pixel_values,
        captions=[e["caption"] for e in good],
        original_size=preferred_then_rejected(good, "original_size"),
        crop_top_left=preferred_then_rejected(good, "crop_top_left"),
        target_size=torch.full((pixel_values.shape[0], 2), res, dtype=torch.long),
        indices=[e["index"] for e in good],
        draw_seeds=[e["draw_seed"] for e in good],
        **extra,
    )
