"""Labeled images for Diffusion-KTO (``loss.type: kto``): one image per example, desirable or undesirable.

Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility", arXiv 2404.04465) learns
from a binary signal per image (a like or a dislike) instead of a comparison between two. Two sources:

- an **unpaired set** (``data.unpaired: true``): one row per image, ``caption``, ``image`` and a ``label`` column
  (``data.image_column``, ``data.desirable_column``; true / 1 desirable, false / 0 undesirable, TRL's KTO
  convention), read by :func:`lora_dpo.data.sources.load_preference_dataset` in any of its layouts with the same
  load-time checks (``bad_label`` for any other label);
- a **pair set**: each kept pair is read as two labeled images, its preferred image desirable (example ``2i``) and
  its rejected one undesirable (``2i + 1``). This is the simplest conversion of comparisons into per-image labels
  (the official code trains on its own processed per-image annotation of Pick-a-Pic, not on this one). No image is
  decoded twice and nothing is rewritten on disk.

:class:`LabeledImages` is the map-style dataset (each example processed by :func:`lora_dpo.data.pairs.make_example`, so
crops, flips and caption dropout are those of the pair path, one draw per image); :func:`collate_images` stacks
examples into an :class:`ImageBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch

from lora_dpo.config import DataConfig
from lora_dpo.data.filters import row_images
from lora_dpo.data.pairs import ExampleBatch, SkippedRow, make_example, split_skipped
from lora_dpo.data.sources import check_columns, undecoded


class LabeledImages(torch.utils.data.Dataset):
    """Map-style dataset of labeled images over the kept rows of an unpaired set, or over the images of a pair set.

    ``__getitem__(j)`` -> example dict, or :class:`lora_dpo.data.pairs.SkippedRow` (an image that fails to decode; a pair
    row skipped this way skips only the image asked for). Example: ``pixel_values`` ``(1, 3, R, R)`` float32 in
    [-1, 1]; ``caption`` str; ``desirable`` bool; ``original_size`` and ``crop_top_left`` ``(1, 2)`` long;
    ``index`` j; ``draw_seed`` the image's training-draw seed, keyed by ``(seed, epoch, j)``
    (:mod:`lora_dpo.data.draws`). Length: the rows of an unpaired set, twice the pairs of a pair set.

    Raises:
        ValueError: a configured column is missing (:func:`lora_dpo.data.sources.check_columns`).
    """

    def __init__(self, hf_dataset: datasets.Dataset, cfg: DataConfig, seed: int) -> None:
        check_columns(list(hf_dataset.column_names), cfg, "hf_dataset")
        self.seed, self.epoch = seed, 0
        label = [cfg.row_label_column] if cfg.row_label_column else []
        columns = [cfg.caption_column, *cfg.row_image_columns, *label]
        self.dataset = undecoded(hf_dataset.select_columns(columns), cfg.row_image_columns)
        self.from_pairs, self.source_cfg = not cfg.unpaired, cfg  # how rows are read
        self.cfg = cfg.model_copy(update={"unpaired": True})  # how each example (one image) is processed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 2 * len(self.dataset) if self.from_pairs else len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        index = int(index)
        if not self.from_pairs:
            return make_example(self.dataset[index], self.cfg, self.seed, self.epoch, index)
        row = self.dataset[index // 2]
        images = row_images(row, self.source_cfg)  # preferred first
        if isinstance(images, str):
            return SkippedRow(images, index)
        side = index % 2
        image_row = {self.cfg.caption_column: row[self.cfg.caption_column], self.cfg.image_column: images[side],
                     self.cfg.desirable_column: side == 0}
        return make_example(image_row, self.cfg, self.seed, self.epoch, index)

    @staticmethod
    def collate(examples: list[dict[str, Any] | SkippedRow]) -> ImageBatch:
        return collate_images(examples)


@dataclass
class ImageBatch(ExampleBatch):
    """A micro-batch of N labeled images (Diffusion-KTO), each with its own caption, noise and timestep.

    pixel_values: (N, 3, R, R) float32 in [-1, 1]. captions: list[str], length N. desirable: (N,) bool.
    The fields of :class:`lora_dpo.data.pairs.ExampleBatch`: (N, 2) conditioning rows; N indices of
    :class:`LabeledImages` and their draw seeds.
    """

    pixel_values: torch.Tensor
    captions: list[str]
    desirable: torch.Tensor


def collate_images(examples: list[dict[str, Any] | SkippedRow]) -> ImageBatch:
    """Drop :class:`lora_dpo.data.pairs.SkippedRow` markers (counted) and stack the rest into an :class:`ImageBatch`, in
    the given order. Never returns None: an all-bad batch has ``len(batch) == 0``."""
    good, extra = split_skipped(examples)
    if not good:
        empty = torch.zeros(0, 2, dtype=torch.long)
        return ImageBatch(pixel_values=torch.zeros(0, 3, 0, 0), captions=[],
                          desirable=torch.zeros(0, dtype=torch.bool), original_size=empty,
                          crop_top_left=empty.clone(), target_size=empty.clone(), indices=[], draw_seeds=[], **extra)
    pixel_values = torch.cat([e["pixel_values"] for e in good])
    return ImageBatch(
        pixel_values=pixel_values,
        captions=[e["caption"] for e in good],
        desirable=torch.tensor([e["desirable"] for e in good], dtype=torch.bool),
        original_size=torch.cat([e["original_size"] for e in good]),
        crop_top_left=torch.cat([e["crop_top_left"] for e in good]),
        target_size=torch.full((len(good), 2), pixel_values.shape[-1], dtype=torch.long),
        indices=[e["index"] for e in good],
        draw_seeds=[e["draw_seed"] for e in good],
        **extra,
    )
