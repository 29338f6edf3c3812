"""Stage 2 of the way of the data: preference rows to checked pairs (or labeled images) to micro-batches, with
the per-pair keyed draws; read from images, a stream or a latent cache. See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.data.cache import (
    CachedBatch,
    CachedPairDataset,
    cache_key,
    check_cache,
    collate_cached,
    read_manifest,
)
from lora_dpo.data.draws import EVAL_SALT, REFERENCE_SALT, TRAIN_SALT, draw_seed, pair_draws, posterior_sample
from lora_dpo.data.filters import SkipCounter
from lora_dpo.data.images import MissingImage, to_rgb
from lora_dpo.data.loader import MicroBatches, PairSampler, StreamedMicroBatches, build_dataloader
from lora_dpo.data.pairs import PairBatch, PairDataset, SkippedRow, collate_pairs
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamedPairs, merge_reports
from lora_dpo.data.unpaired import ImageBatch, LabeledImages, collate_images

__all__ = [
    "CachedBatch",
    "CachedPairDataset",
    "EVAL_SALT",
    "ImageBatch",
    "LabeledImages",
    "MicroBatches",
    "MissingImage",
    "PairBatch",
    "PairDataset",
    "PairSampler",
    "REFERENCE_SALT",
    "SkipCounter",
    "SkippedRow",
    "StreamedMicroBatches",
    "StreamedPairs",
    "TRAIN_SALT",
    "build_dataloader",
    "cache_key",
    "check_cache",
    "collate_cached",
    "collate_images",
    "collate_pairs",
    "draw_seed",
    "load_preference_dataset",
    "merge_reports",
    "pair_draws",
    "posterior_sample",
    "read_manifest",
    "to_rgb",
]
