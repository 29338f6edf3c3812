"""Preference pairs in the Pick-a-Pic schema -> oriented, cropped, batched image pairs for Diffusion-DPO.

Source: Wallace et al. 2023 (arXiv 2311.12908), §5: each row holds a caption, two images (``jpg_0``, ``jpg_1``)
and ``label_0`` (1: ``jpg_0`` preferred, 0: ``jpg_1`` preferred, 0.5: tie). Ties carry no preference and are
dropped. Everywhere below the PREFERRED image (x_w) comes first and the rejected one (x_l) second.

Flow, one module a step (each imports only the ones above it):

- :mod:`lora_dpo.data.images`: image values (bytes, datasets dicts, PIL images, paths / uids) -> opened, RGB,
  resized images and their digests;
- :mod:`lora_dpo.data.filters`: the load-time checks of one row (:class:`lora_dpo.data.filters.RowScanner`) and the
  keep / skip decisions counted by reason (:class:`lora_dpo.data.filters.SkipCounter`);
- :mod:`lora_dpo.data.sources`: :func:`lora_dpo.data.sources.load_preference_dataset`: the source opened in any layout,
  its columns checked, the rows checked -> the kept rows and the report;
- :mod:`lora_dpo.data.pairs`: :class:`lora_dpo.data.pairs.PairDataset` (decode, orient, RGB, resize, one
  crop/flip/caption-dropout draw per pair) -> :func:`lora_dpo.data.pairs.collate_pairs` ->
  :class:`lora_dpo.data.pairs.PairBatch`;
- :mod:`lora_dpo.data.streaming` (``data.streaming``): :class:`lora_dpo.data.streaming.StreamedPairs` runs the same
  checks and the same per-pair processing on the fly over a datasets ``IterableDataset``, one share per
  process, with a resumable position;
- :mod:`lora_dpo.data.unpaired` (``loss.type: kto``): :class:`lora_dpo.data.unpaired.LabeledImages`, labeled images from an
  unpaired set (``data.unpaired``) or from a pair set's preferred and rejected images, batched as
  :class:`lora_dpo.data.unpaired.ImageBatch`;
- this module: :class:`PairSampler` (deterministic, resumable, sharded order), :func:`build_dataloader`
  (one epoch's DataLoader of :class:`lora_dpo.data.pairs.PairBatch`), and the endless, resumable micro-batch
  iterators the training loop draws from: :class:`MicroBatches` (map-style data sets) and
  :class:`StreamedMicroBatches` (``data.streaming``).

Other layouts are mapped into the Pick-a-Pic schema on loading (the configured column names), so everything
downstream is unchanged: a ``w/`` + ``l/`` image folder with ``metadata.jsonl``, a table of
``preferred``/``rejected`` columns (e.g. a CSV of paths), Pick-a-Pic's ``*_no_images`` tables whose image
columns name files under ``data.image_root`` (see :func:`lora_dpo.data.sources.load_preference_dataset`).

The public names of the whole flow (``__all__``) are importable from here as well.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch

from lora_dpo.config import DataConfig
from lora_dpo.data.filters import SkipCounter
from lora_dpo.data.pairs import PairBatch, PairDataset, SkippedRow, collate_pairs
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamedPairs, merge_reports

__all__ = [
    "MicroBatches", "PairBatch", "PairSampler", "PairDataset", "SkipCounter", "SkippedRow", "StreamedMicroBatches",
    "StreamedPairs", "build_dataloader", "collate_pairs", "load_preference_dataset", "merge_reports",
]

# Salt of the sampler's random stream (apart from the per-item one, lora_dpo.data.pairs.ITEM_SALT).
_SAMPLER_SALT = 0x5A3D


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
    """One epoch's DataLoader of :class:`PairBatch` (PairDataset + PairSampler, both at ``epoch``), skipping
    the first ``start_batch`` micro-batches of this rank (resume). ``drop_last=True``: every micro-batch has
    ``batch_size`` rows before undecodable ones are dropped. Rebuild it for each epoch.

    ``hf_dataset`` may also be a ready pairs dataset with ``set_epoch`` and a ``collate`` function (the latent
    cache's :class:`lora_dpo.data.cache.CachedPairDataset`): it is then used as it is, with the same sampler.

    Raises:
        ValueError: this rank's shard holds fewer than ``batch_size`` pairs (the epoch would be empty).
    """
    pairs = hf_dataset if hasattr(hf_dataset, "collate") else PairDataset(hf_dataset, cfg, seed)
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


class MicroBatches:
    """Endless micro-batches of a map-style data set for one process, epoch after epoch, with a resumable position:
    what the training loop draws from (:meth:`next`).

    The data set is a :class:`lora_dpo.data.pairs.PairDataset` source table (or a ready data set with a
    ``collate``: the latent cache's pairs, KTO's labeled images), read through :func:`build_dataloader`. The position
    is ``(epoch, batch_in_epoch)``: how many micro-batches of the current epoch were consumed. Rows whose images fail
    to decode are dropped from their batch and counted (``skipped``); an all-bad batch is skipped whole.
    """

    def __init__(self, dataset, data_cfg, batch_size: int, seed: int, num_replicas: int, rank: int,
                 epoch: int = 0, batch_in_epoch: int = 0):
        self.dataset, self.data_cfg, self.batch_size, self.seed = dataset, data_cfg, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.skipped: dict[str, int] = {}
        self._iter = None

    def _open(self):
        loader = build_dataloader(
            self.dataset, self.data_cfg, self.batch_size, self.seed, num_replicas=self.num_replicas,
            rank=self.rank, epoch=self.epoch, start_batch=self.batch_in_epoch,
        )
        self._iter = iter(loader)

    def next(self):
        """The next micro-batch with at least one usable row."""
        while True:
            if self._iter is None:
                self._open()
            batch = next(self._iter, None)
            if batch is None:  # epoch exhausted
                self.epoch, self.batch_in_epoch, self._iter = self.epoch + 1, 0, None
                continue
            self.batch_in_epoch += 1
            for reason, n in (batch.skipped or {}).items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            if len(batch) > 0:
                return batch

    def state(self) -> dict[str, Any]:
        """The position for a checkpoint's ``trainer_state.json``."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "skipped_in_training": self.skipped}


class StreamedMicroBatches:
    """:class:`MicroBatches`' interface over a streamed data set (``data.streaming``,
    :class:`lora_dpo.data.streaming.StreamedPairs`): this process's share, read once per epoch without being stored,
    with a resumable position (``data_state``: a checkpoint's :meth:`state`, or ``{}``)."""

    def __init__(self, data_cfg, batch_size: int, seed: int, num_replicas: int, rank: int, data_state: dict):
        self.pairs = StreamedPairs(data_cfg, seed=seed, num_replicas=num_replicas, rank=rank)
        if "stream" in data_state:
            self.pairs.load_state_dict(data_state["stream"])
        self.skipped: dict[str, int] = dict(data_state.get("skipped_in_training", {}))
        self._batches = self.pairs.batches(batch_size)

    def next(self):
        """The next micro-batch with at least one usable row."""
        while True:
            batch = next(self._batches)
            for reason, n in (batch.skipped or {}).items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            if len(batch) > 0:
                return batch

    @property
    def epoch(self) -> int:
        return self.pairs.epoch

    def state(self) -> dict[str, Any]:
        """The position for a checkpoint's ``trainer_state.json``, the stream's own state included."""
        return {"epoch": self.pairs.epoch, "batch_in_epoch": None, "stream": self.pairs.state_dict(),
                "skipped_in_training": self.skipped}
