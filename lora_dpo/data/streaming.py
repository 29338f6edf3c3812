"""Pairs streamed from a data set that need not fit on disk (``data.streaming``), and the merged report.

:class:`StreamedPairs` opens the source with :func:`lora_dpo.data.sources.open_checked`, runs the load-time checks
of :mod:`lora_dpo.data.filters` and the per-pair processing of :func:`lora_dpo.data.pairs.make_example` on the fly, one
share per process, with a resumable position; :func:`merge_reports` adds up the processes' counts.

Below, :func:`load_preference_dataset` is :func:`lora_dpo.data.sources.load_preference_dataset`,
:class:`PairDataset` is :class:`lora_dpo.data.pairs.PairDataset` and :func:`build_dataloader` is
:func:`lora_dpo.data.loader.build_dataloader`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from datasets.distributed import split_dataset_by_node

from lora_dpo.config import DataConfig
from lora_dpo.data.filters import Admission
from lora_dpo.data.pairs import PairBatch, SkippedRow, collate_pairs, make_example
from lora_dpo.data.sources import open_checked, read_rows


class StreamedPairs:
    """Pairs streamed from a data set that need not fit on disk (``data.streaming: true``): this process's
    share, checked, oriented and processed on the fly, with a resumable position.

    The source is ``cfg.dataset`` opened as :func:`load_preference_dataset` opens it, but with
    ``load_dataset(..., streaming=True)`` (a save_to_disk or ``w/`` + ``l/`` folder via
    ``to_iterable_dataset``), reduced to the columns the checks read, shuffled when ``cfg.shuffle_buffer`` > 0
    (``IterableDataset.shuffle`` seeded by ``seed``: shard order and a buffer of rows) and split by
    ``split_dataset_by_node`` (whole shards per process when their number is a multiple of ``num_replicas``,
    else every ``num_replicas``-th row): the shares are disjoint. Each row gets the checks of
    :func:`load_preference_dataset` (same reasons; ``duplicate`` among this process's rows of the current
    epoch), then the processing of :class:`PairDataset`: the same example dicts, or :class:`SkippedRow`
    for images that fail to decode. The per-pair draw is keyed by ``index = k * num_replicas + rank`` for this
    process's k-th kept row of the epoch, so with one process and ``shuffle_buffer=0`` the pairs and draws are
    those of the map-style path. ``cfg.max_pairs`` caps each process's kept rows per epoch at
    ``ceil(max_pairs / num_replicas)``. Iterating the object runs the rest of the current epoch; when the
    epoch ends, the next iteration starts the next one.

    What a training loop must call (decoding runs in the calling process; ``data.num_workers`` is not used)::

        stream = StreamedPairs(cfg.data, seed=cfg.train.seed, num_replicas=world, rank=rank)
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

    Raises (on construction): as :func:`load_preference_dataset` for the source and its columns (its first
    row is read: an empty or unreadable first file raises DataError now); ValueError for a rank outside
    ``[0, num_replicas)``. While iterating: DataError for a data file that cannot be read (names it).
    """

    def __init__(self, cfg: DataConfig, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        source, self.base, self._scanner = open_checked(cfg, streaming=True)
        source = source.select_columns(self._scanner.columns)
        if cfg.shuffle_buffer:
            source = source.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
        self.source = split_dataset_by_node(source, rank=rank, world_size=num_replicas)
        self.cfg, self.seed, self.num_replicas, self.rank = cfg, seed, num_replicas, rank
        self._limit = math.ceil(cfg.max_pairs / num_replicas) if cfg.max_pairs else None
        self.epoch, self._admission, self._first_pass = 0, Admission(), None

    def _done(self) -> bool:
        return self._limit is not None and self._admission.kept >= self._limit

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedRow]:
        epoch = self.epoch
        self.source.set_epoch(epoch)  # datasets reshuffles per epoch and resumes only within the saved one
        if not self._done():
            for row in read_rows(self.source, self.cfg):  # an unreadable file: a DataError naming it
                if not self._admission.admit(*self._scanner.check(row)):
                    continue
                index = (self._admission.kept - 1) * self.num_replicas + self.rank
                yield make_example(row, self.cfg, self.seed, epoch, index, self.base)
                if self._done():
                    break
        if epoch == 0:  # the first pass saw every row of this share: its counts are the report
            self._first_pass = self._admission.report()
        self.epoch, self._admission = epoch + 1, Admission()

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
        self._admission = Admission.from_state(state["admission"])
        self._first_pass = state.get("first_pass")
        self.source.load_state_dict(state["source"])

    def _identity(self) -> dict[str, int]:
        return {"rank": self.rank, "num_replicas": self.num_replicas, "seed": self.seed,
                "shuffle_buffer": self.cfg.shuffle_buffer}


def merge_reports(reports: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The data report of a streamed run: the sum of the processes' :meth:`StreamedPairs.report` (disjoint
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
