"""The latent cache (``lora-dpo cache``): every pair encoded once, and optionally its reference errors precomputed.

A cache is a folder of ``datasets`` (Arrow) shards, one row per kept pair, in the order of
:func:`lora_dpo.data.sources.load_preference_dataset`, so a pair keeps its index and training from the cache draws the same
flips, caption dropouts, posterior samples, noise and timesteps as training from the images:

- ``latents``: the VAE posterior of both images, ``mean`` and ``std`` (``(F, 2, 2, C, h, w)``: flip variant, then
  mean/std, then preferred/rejected; F = 2 when ``data.random_flip`` is on, both flips cached), in ``storage dtype``.
  The latent is sampled at training time, ``z = (mean + std·ε)·scaling_factor``, with the pair's keyed draw
  (:mod:`lora_dpo.data.draws`), as ``vae.encode(x).latent_dist.sample()`` does: a cache in the VAE's dtype reproduces the
  uncached run.
- ``caption_id``: the row of the caption's text conditioning in the ``text_*`` shards, which hold each distinct
  caption once (Pick-a-Pic has about 15 pairs per caption): ``hidden`` ``(L, D)`` and, for SDXL, ``pooled`` ``(P,)``
  (:func:`lora_dpo.models.loading.encode_prompts`, float32); the empty caption's (caption dropout) is stored once too.
- ``original_size``, ``crop_top_left`` ``(2, 2)``: SDXL micro-conditioning of the centre crop.
- ``ref_mse`` ``(F, K, 2)`` (optional, ``reference_draws`` K > 0): the reference errors e_ref(w), e_ref(l) of K fixed
  draws per pair (posterior sample, noise, timestep from the seed ``draw_seed(REFERENCE_SALT, seed, index, k)``,
  :func:`lora_dpo.data.draws.pair_draws`); training on draw k reuses that seed, then runs no reference forward, and full fine-tuning keeps no reference copy (TRL's ``precompute_ref_log_probs``).
- ``ok`` / ``skip_reason``: a row whose images failed to decode stays in place, marked, and is skipped (and counted)
  at training time exactly as the image path skips it.

What caching gives up: random crops (the crop is the centre one; ``data.random_crop`` is refused) and per-epoch
re-encoding; flips are kept by caching both. The cache is keyed (``cache.json``: model, VAE and text encoders,
resolution, preprocessing, data set and filters, storage dtype, reference draws): a run whose recipe differs in any
of these refuses a stale cache, naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from lora_dpo.data.draws import REFERENCE_SALT, TRAIN_SALT, draw_seed, pair_draws, posterior_sample
from lora_dpo.data.pairs import (
    ITEM_SALT,
    PreferencePairs,
    SkippedRow,
    collate_pairs,
    preferred_then_rejected,
    split_skipped,
)
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamingPairs

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: keyed draws (lora_dpo.data.draws); 3: text conditioning once per caption
MANIFEST = "cache.json"
EMPTY_CAPTION = "empty_caption.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Key and manifest


def cache_key(cfg, reference_draws: int, storage_dtype: str) -> dict[str, Any]:
    """What a cache depends on; a run uses a cache only if its recipe gives the same key.

    Model (id or path, revision, variant, the UNet / VAE / text-encoder configs' hashes), resolution and
    preprocessing, the data set and its filters, storage dtype, and for precomputed reference errors the
    reference itself (mode, precision, starting LoRA, loss type, seed)."""
    from lora_dpo.models.loading import read_model_index

    m, d = cfg.model, cfg.data
    index = read_model_index(m.pretrained_model_name_or_path, m.revision)
    key: dict[str, Any] = {
        "version": CACHE_VERSION, "model": m.pretrained_model_name_or_path, "revision": m.revision,
        "variant": m.variant, "model_index": _digest(index), "vae_dtype": m.vae_dtype,
        "mixed_precision": cfg.train.mixed_precision, "resolution": d.resolution, "random_flip": d.random_flip,
        "dataset": d.dataset, "split": d.split, "caption_column": d.caption_column,
        "image_columns": list(d.image_columns), "label_column": d.label_column, "drop_ties": d.drop_ties,
        "min_score_gap": d.min_score_gap, "max_pairs": d.max_pairs, "image_root": d.image_root,
        "are_different_column": d.are_different_column, "drop_duplicates": d.drop_duplicates,
        "drop_identical_images": d.drop_identical_images, "storage_dtype": storage_dtype,
        "reference_draws": reference_draws,
    }
    if reference_draws:
        key.update(mode=cfg.train.mode, reference=cfg.reference.model_dump(), init_from=_file_digest(cfg.lora.init_from),
                   seed=cfg.train.seed, prediction_type=m.prediction_type)
    return key


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    from lora_dpo.models.lora_files import resolve_lora_file

    return hashlib.sha256(resolve_lora_file(path).read_bytes()).hexdigest()[:16]


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The cache's ``cache.json``. Raises FileNotFoundError (not a cache folder)."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir} is not a lora-dpo cache (no {MANIFEST}); build one with lora-dpo cache")
    return json.loads(path.read_text())


def check_cache(cfg, cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache that fits the recipe ``cfg``.

    Raises:
        FileNotFoundError: not a cache. ValueError: the cache is incomplete (resume ``lora-dpo cache``), was built
            for another recipe (the keys that differ are named: a stale cache is never used silently), or the recipe
            asks for something a cache cannot give (``data.random_crop``).
    """
    manifest = read_manifest(cache_dir)
    if not manifest.get("complete"):
        total = manifest.get("pairs") or "a streamed number of"
        raise ValueError(f"the cache {cache_dir} is incomplete ({manifest.get('pairs_done', 0)} of {total} pairs): "
                         "run the same lora-dpo cache command again to finish it")
    if cfg.data.random_crop:
        raise ValueError("data.random_crop cannot train from a cache (it stores the centre crop); set "
                         "data.random_crop=false or train from the images")
    built = manifest["key"]
    want = cache_key(cfg, built.get("reference_draws", 0), built["storage_dtype"])
    differ = sorted(k for k in set(built) | set(want) if built.get(k) != want.get(k))
    if differ:
        shown = "; ".join(f"{k}: cache {built.get(k)!r}, recipe {want.get(k)!r}" for k in differ[:4])
        raise ValueError(f"the cache {cache_dir} was built for another recipe ({shown}). Rebuild it: lora-dpo cache "
                         "RECIPE --out DIR --overwrite, or point data.latent_cache elsewhere")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Training-time dataset and batch


@dataclass
class CachedBatch:
    """A micro-batch of B cached pairs; image-level tensors hold 2B rows, ALL preferred first (as PairBatch).

    latent_mean, latent_std: (2B, C, h, w) posterior, in the cache's storage dtype (the flip variant drawn).
    text: ``{"encoder_hidden_states": (B, L, D)}`` (+ ``"text_embeds": (B, P)`` for SDXL), float32.
    original_size, crop_top_left, target_size: (2B, 2) long.
    ref_mse: (2B,) float32 precomputed reference errors of the draws ``draw_seeds`` give, or None.
    indices, draw_seeds, num_skipped, skipped: as :class:`lora_dpo.data.pairs.PairBatch` (with precomputed reference
        errors, the seeds of the cached draws).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text: dict[str, torch.Tensor]
    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    target_size: torch.Tensor
    indices: list[int]
    draw_seeds: list[int]
    ref_mse: torch.Tensor | None = None
    num_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return self.num_pairs

    def to(self, device, non_blocking: bool = False) -> CachedBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self, latent_mean=move(self.latent_mean), latent_std=move(self.latent_std),
            text={k: move(v) for k, v in self.text.items()}, original_size=move(self.original_size),
            crop_top_left=move(self.crop_top_left), target_size=move(self.target_size), ref_mse=move(self.ref_mse),
        )


class CachedPairs(torch.utils.data.Dataset):
    """Map-style dataset over a cache's rows, drawing per (seed, epoch, index) exactly what
    :class:`lora_dpo.data.pairs.PreferencePairs` draws (flip, caption dropout), so both paths see the same pairs.

    ``__getitem__`` returns a dict (or :class:`lora_dpo.data.pairs.SkippedRow` for a row that failed at cache time).
    With precomputed reference errors, epoch e uses draw ``e % K`` of each pair: its errors and its seed.
    """

    def __init__(self, cache_dir: str | Path, cfg, seed: int, manifest: dict | None = None) -> None:
        from safetensors.torch import load_file

        self.dir, self.cfg, self.seed, self.epoch = Path(cache_dir), cfg, seed, 0
        self.manifest = manifest or read_manifest(cache_dir)
        shards = [datasets.load_from_disk(str(self.dir / s)) for s in self.manifest["shards"]]
        self.rows = datasets.concatenate_datasets(shards).with_format(None)
        # the distinct captions' conditioning, row k = caption_id k
        self.texts = datasets.concatenate_datasets(
            [datasets.load_from_disk(str(self.dir / t)) for t in self.manifest["text_shards"]]).with_format(None)
        self.empty = load_file(self.dir / EMPTY_CAPTION)
        self.dtype = STORAGE_DTYPES[self.manifest["key"]["storage_dtype"]]
        self.shape = self.manifest["latent_shape"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def collate(examples: list) -> CachedBatch:
        return collate_cached(examples)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        index = int(index)
        row = self.rows[index]
        if not row["ok"]:
            return SkippedRow(row["skip_reason"], index)
        _, _, flip_u, drop_u = np.random.default_rng([ITEM_SALT, self.seed % 2**64, self.epoch, index]).random(4)
        flip = int(self.cfg.random_flip and flip_u < 0.5)
        latents = _tensor(row["latents"], self.dtype, (-1, 2, 2, *self.shape))[flip]  # (2: mean/std, 2: w/l, C,h,w)
        if drop_u < self.cfg.caption_dropout:
            text = {k: v.clone() for k, v in self.empty.items()}
        else:
            stored = self.texts[row["caption_id"]]
            text = {"encoder_hidden_states": _tensor(stored["hidden"], torch.float32, self.manifest["hidden_shape"])}
            if stored["pooled"]:
                text["text_embeds"] = _tensor(stored["pooled"], torch.float32, self.manifest["pooled_shape"])
        item = {"latent_mean": latents[0], "latent_std": latents[1], "text": text, "index": index,
                "original_size": torch.tensor(row["original_size"]).view(2, 2),
                "crop_top_left": torch.tensor(row["crop_top_left"]).view(2, 2),
                "target_size": torch.full((2, 2), self.cfg.resolution, dtype=torch.long),
                "draw_seed": draw_seed(TRAIN_SALT, self.seed, self.epoch, index)}
        draws = self.manifest["key"]["reference_draws"]
        if draws:
            k = self.epoch % draws
            item["ref_mse"] = _tensor(row["ref_mse"], torch.float32, (-1, draws, 2))[flip, k]
            item["draw_seed"] = draw_seed(REFERENCE_SALT, self.seed, index, k)
        return item


def _tensor(raw: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=dtype).view(*shape).clone()


def collate_cached(examples: list) -> CachedBatch:
    """Stack cached examples into a :class:`CachedBatch` (preferred rows of all pairs first); skipped rows are
    counted, as :func:`lora_dpo.data.pairs.collate_pairs` counts them."""
    good, extra = split_skipped(examples)
    if not good:
        empty = torch.zeros(0, 2, dtype=torch.long)
        return CachedBatch(torch.zeros(0), torch.zeros(0), {}, empty, empty.clone(), empty.clone(), [], [], **extra)

    rows = {key: preferred_then_rejected(good, key) for key in
            ("latent_mean", "latent_std", "original_size", "crop_top_left", "target_size")}
    batch = CachedBatch(**rows, text={k: torch.stack([e["text"][k] for e in good]) for k in good[0]["text"]},
                        indices=[e["index"] for e in good], draw_seeds=[e["draw_seed"] for e in good], **extra)
    if "ref_mse" in good[0]:
        batch.ref_mse = preferred_then_rejected(good, "ref_mse")
    return batch


# ----------------------------------------------------------------------------------------------------------
# Building


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)


def build_cache(cfg, out: str | Path, *, shard_size: int = 1000, batch_size: int = 8, reference_draws: int = 0,
                storage_dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Encode the recipe's pairs once into ``out`` (see the module docstring); resumable, shard by shard.

    Args:
        cfg: the recipe (model, data, and for ``reference_draws`` the policy's reference: ``train.mode``,
            ``lora.init_from``, ``reference``, ``train.mixed_precision``, ``train.seed``).
        shard_size: pairs per Arrow shard; a finished shard is never redone, so an interrupted build continues
            where it stopped (run the same command again). Memory is bounded by one shard, whatever the data size.
            With ``data.streaming`` the source is read as a stream (:class:`lora_dpo.data.streaming.StreamingPairs`, no
            shuffle buffer: the rows, indices and key of the map-style build) and never converted to Arrow whole;
            the manifest keeps the stream position of the last finished shard.
        batch_size: pairs per VAE / text-encoder / UNet call.
        reference_draws: K > 0 also computes the reference errors of K fixed draws per pair (and flip variant).
        storage_dtype: of the latents (default: the VAE's dtype, which reproduces the image path exactly;
            ``float16`` halves the disk).
    Returns:
        The manifest (``cache.json``): key, shapes, counts, ``skipped`` by reason, seconds.
    Raises:
        ValueError: a recipe a cache cannot serve (random crops, KTO; caption dropout or SFT with ``reference_draws``),
            or ``out`` holds a cache built with another key (pass ``overwrite``).
    """
    from lora_dpo.models.loading import DTYPES, encode_prompts, load_components
    from lora_dpo.training.recipe import setup_policy

    if cfg.data.random_crop:
        raise ValueError("data.random_crop cannot be cached (the cache stores the centre crop): set it to false")
    if cfg.loss.type == "kto":
        raise ValueError("loss.type=kto trains on labeled images, which the latent cache does not hold yet: train "
                         "it from the data set (no data.latent_cache)")
    if reference_draws and (cfg.data.caption_dropout or not cfg.loss.needs_reference):
        raise ValueError("precomputed reference errors need data.caption_dropout=0 and a loss with a reference "
                         f"(loss.type={cfg.loss.type})")
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    out = Path(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    # The source, opened and checked before any weights load: the kept rows (map-style), or a stream of them
    # (data.streaming: never converted or stored whole; the same rows in the same order, so the same indices).
    data_cfg = cfg.data.model_copy(update={"random_flip": False, "caption_dropout": 0.0, "shuffle_buffer": 0})
    if cfg.data.streaming:
        stream, dataset, report = StreamingPairs(data_cfg, cfg.train.seed), None, None
    else:
        stream = None
        dataset, report = load_preference_dataset(cfg.data)
    unet_dtype = torch.float32 if cfg.train.mode == "full" else None  # as training loads it (the reference's source)
    components = load_components(cfg.model, weight_dtype, device, unet_dtype=unet_dtype, unet=bool(reference_draws))
    vae_dtype = next(components.vae.parameters()).dtype
    storage_dtype = storage_dtype or str(vae_dtype).removeprefix("torch.")
    key = cache_key(cfg, reference_draws, storage_dtype)
    manifest = None
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest["key"] != key:
            if not overwrite:
                raise ValueError(f"{out} holds a cache built for another recipe or options: pass --overwrite to replace "
                                 "it, or choose another folder")
            shutil.rmtree(out)
            manifest = None
        elif manifest.get("complete"):
            log.info("cache %s is complete (%d pairs)", out, manifest["pairs"])
            return manifest
    out.mkdir(parents=True, exist_ok=True)
    policy = None
    if reference_draws:
        _, policy, _ = setup_policy(cfg, device, components)  # in train mode, as in training (CPU kernels differ)
    empty = {k: v.float().cpu().contiguous() for k, v in encode_prompts(components, [""]).items()}
    from safetensors.torch import save_file

    save_file({k: v[0] for k, v in empty.items()}, str(out / EMPTY_CAPTION))
    manifest = manifest or {
        "key": key, "complete": False, "pairs": len(dataset) if dataset is not None else None, "pairs_done": 0,
        "shards": [], "text_shards": [], "skipped": {}, "data_report": report, "scaling_factor": components.latent_scale,
        "num_train_timesteps": components.noise_scheduler.config.num_train_timesteps, "family": components.family,
    }
    _write_manifest(out, manifest)
    if stream is not None:
        if manifest.get("stream"):
            stream.load_state_dict(manifest["stream"])  # just past the last pair of the last finished shard
        items = iter(stream)
    else:
        pairs = PreferencePairs(dataset, data_cfg, cfg.train.seed)
        items = (pairs[i] for i in range(manifest["pairs_done"], len(dataset)))
    encoder = _ShardEncoder(components, policy, cfg, reference_draws, STORAGE_DTYPES[storage_dtype], weight_dtype,
                            device, batch_size)
    for name in manifest["text_shards"]:  # resuming: the captions already stored keep their ids
        for caption in datasets.load_from_disk(str(out / name))["caption"]:
            encoder.caption_ids[caption] = len(encoder.caption_ids)
    from tqdm.auto import tqdm

    bar = tqdm(total=manifest["pairs"], initial=manifest["pairs_done"], desc="cache", unit="pair", disable=not progress)
    while chunk := list(itertools.islice(items, shard_size)):  # a shard at a time is held, whatever the data size
        columns, texts = encoder.encode(chunk, manifest, bar)
        number = len(manifest["shards"])
        _save_shard(out, f"text_{number:05d}", texts, _TEXT_FEATURES)  # the captions first seen in this shard
        _save_shard(out, f"shard_{number:05d}", columns)
        manifest["text_shards"].append(f"text_{number:05d}")
        manifest["shards"].append(f"shard_{number:05d}")
        manifest["pairs_done"] += len(chunk)
        if stream is not None:
            manifest["stream"] = stream.state_dict()
        manifest.update(encoder.shapes)
        _write_manifest(out, manifest)
    bar.close()
    if stream is not None:
        manifest.update(pairs=manifest["pairs_done"], data_report={**stream.report(), "streaming": True})
    manifest.update(complete=True, seconds=round(time.perf_counter() - started, 1) + manifest.get("seconds", 0))
    _write_manifest(out, manifest)
    log.info("cache %s: %d pairs in %d shards, skipped %s", out, manifest["pairs"], len(manifest["shards"]),
             manifest["skipped"])
    return manifest


_TEXT_FEATURES = datasets.Features({"caption": datasets.Value("string"), "hidden": datasets.Value("binary"),
                                    "pooled": datasets.Value("binary")})


def _save_shard(out: Path, name: str, columns: dict[str, list], features: datasets.Features | None = None) -> None:
    """Write ``columns`` as the Arrow dataset ``out/name``, atomically (a temporary folder renamed into place)."""
    tmp = out / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp))
    shutil.rmtree(out / name, ignore_errors=True)
    tmp.replace(out / name)


class _ShardEncoder:
    """Encodes a shard's examples, ``batch_size`` pairs per VAE / text-encoder / UNet call, into the cache's columns
    (see the module docstring) and the text rows of the captions not seen before (``caption_ids`` grows, in order);
    remembers the shapes for the manifest."""

    def __init__(self, components, policy, cfg, reference_draws: int, store: torch.dtype, weight_dtype, device,
                 batch_size: int):
        self.components, self.policy, self.draws, self.seed = components, policy, reference_draws, cfg.train.seed
        self.flips = (False, True) if cfg.data.random_flip else (False,)
        self.store, self.weight_dtype, self.device, self.batch_size = store, weight_dtype, device, batch_size
        self.shapes: dict[str, Any] = {}
        self.caption_ids: dict[str, int] = {}

    def encode(self, chunk: list, manifest: dict, bar) -> tuple[dict[str, list], dict[str, list]]:
        from lora_dpo.models.loading import encode_posterior, encode_prompts

        columns: dict[str, list] = {c: [] for c in ("index", "ok", "skip_reason", "latents", "caption_id",
                                                    "original_size", "crop_top_left", "ref_mse")}
        texts: dict[str, list] = {"caption": [], "hidden": [], "pooled": []}
        for b0 in range(0, len(chunk), self.batch_size):
            items = chunk[b0:b0 + self.batch_size]
            batch = collate_pairs(items).to(self.device)
            good = iter(range(batch.num_pairs))
            if batch.num_pairs:
                with torch.no_grad():
                    text = encode_prompts(self.components, batch.captions)
                    variants = []
                    for flip in self.flips:
                        x = batch.pixel_values.flip(-1) if flip else batch.pixel_values
                        mean, std = encode_posterior(self.components, x)
                        variants.append((mean.to(self.store), std.to(self.store)))  # as training will read them
                refs = _reference_errors(self.components, self.policy, batch, text, variants, self.draws, self.seed,
                                         self.weight_dtype, self.device)
                B = batch.num_pairs
                self.shapes = {"latent_shape": list(variants[0][0].shape[1:]),
                               "hidden_shape": list(text["encoder_hidden_states"].shape[1:]),
                               "pooled_shape": list(text["text_embeds"].shape[1:]) if "text_embeds" in text else None}
            for item in items:
                columns["ok"].append(not isinstance(item, SkippedRow))
                if isinstance(item, SkippedRow):
                    columns["index"].append(item.index)
                    columns["skip_reason"].append(item.reason)
                    for c in ("latents", "ref_mse"):
                        columns[c].append(b"")
                    columns["caption_id"].append(-1)
                    columns["original_size"].append([0] * 4)
                    columns["crop_top_left"].append([0] * 4)
                    manifest["skipped"][item.reason] = manifest["skipped"].get(item.reason, 0) + 1
                    continue
                j = next(good)
                rows = [j, B + j]  # preferred, rejected
                lat = torch.stack([torch.stack([m[rows], s[rows]]) for m, s in variants])  # (F, 2, 2, C, h, w)
                columns["index"].append(item["index"])
                columns["skip_reason"].append("")
                columns["latents"].append(_bytes(lat, self.store))
                caption = batch.captions[j]
                if caption not in self.caption_ids:
                    self.caption_ids[caption] = len(self.caption_ids)
                    texts["caption"].append(caption)
                    texts["hidden"].append(_bytes(text["encoder_hidden_states"][j], torch.float32))
                    texts["pooled"].append(_bytes(text["text_embeds"][j], torch.float32) if "text_embeds" in text
                                           else b"")
                columns["caption_id"].append(self.caption_ids[caption])
                columns["original_size"].append(batch.original_size[rows].flatten().tolist())
                columns["crop_top_left"].append(batch.crop_top_left[rows].flatten().tolist())
                columns["ref_mse"].append(_bytes(refs[:, :, rows], torch.float32) if refs is not None else b"")
            bar.update(len(items))
        return columns, texts


def _bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    return t.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()


@torch.no_grad()
def _reference_errors(components, policy, batch, text, variants, draws, seed, weight_dtype, device):
    """``(F, K, 2B)`` reference errors of the draws ``draw_seed(REFERENCE_SALT, seed, index, k)`` (preferred rows
    first), from the posteriors as stored; None without draws."""
    from lora_dpo.models.loading import training_target, unet_conditioning
    from lora_dpo.training.losses import per_sample_mse

    if not draws:
        return None
    cond = unet_conditioning(components, text, batch, weight_dtype)
    autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
    T = components.noise_scheduler.config.num_train_timesteps
    out = torch.empty(len(variants), draws, 2 * batch.num_pairs)
    for f, (mean, std) in enumerate(variants):
        for k in range(draws):
            seeds = [draw_seed(REFERENCE_SALT, seed, index, k) for index in batch.indices]
            eps_z, noise, timesteps = pair_draws(seeds, mean.shape[1:], T, device)
            latents = posterior_sample(mean, std, eps_z, components.latent_scale)
            noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
            noisy = components.noise_scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
            target = training_target(components, latents, noise, timesteps)
            with policy.reference() as ref_unet, autocast:
                pred = ref_unet(noisy, timesteps, **cond).sample
            out[f, k] = per_sample_mse(pred, target).float().cpu()
    return out
