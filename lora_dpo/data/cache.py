"""Reading the latent cache (``lora-dpo cache``): every pair encoded once, and optionally its reference errors
precomputed. :mod:`lora_dpo.training.cache_build` builds it.

A cache is a folder of ``datasets`` (Arrow) shards, one row per kept pair, in the order of
:func:`lora_dpo.data.sources.load_preference_dataset`, so a pair keeps its index and training from the cache draws the same
flips, caption dropouts, posterior samples, noise and timesteps as training from the images:

- ``latents``: the VAE posterior of both images, ``mean`` and ``std`` (``(F, 2, 2, C, h, w)``: flip variant, then
  mean/std, then preferred/rejected; F = 2 when ``data.random_flip`` is on, both flips cached), in ``storage dtype``
  (C = 4 for SD1.5/SDXL, 16 for SD3/FLUX, whose stored mean is ``mean − shift_factor``:
  :meth:`lora_dpo.models.families.base.ModelFamily.encode_posterior`).
  The latent is sampled at training time, ``z = (mean + std·ε)·scaling_factor``, with the pair's keyed draw
  (:mod:`lora_dpo.data.draws`), as ``vae.encode(x).latent_dist.sample()`` does: a cache in the VAE's dtype reproduces the
  uncached run.
- ``caption_id``: the row of the caption's text conditioning in the ``text_*`` shards, which hold each distinct
  caption once (Pick-a-Pic has about 15 pairs per caption): ``hidden`` ``(L, D)`` and, where the family has one, a
  pooled ``(P,)`` (:func:`lora_dpo.models.loading.encode_prompts`, float32); the manifest's ``text_keys`` names the
  conditioning keys they are read back as (SD1.5: ``encoder_hidden_states``; SDXL: ``+ text_embeds (1280,)``; SD3:
  ``encoder_hidden_states (77 + 256, 4096)`` and ``pooled_projections (2048,)``; FLUX: T5's ``encoder_hidden_states
  (512, 4096)`` and CLIP's ``pooled_projections (768,)``). The empty caption's (caption dropout) is stored once too.
- ``original_size``, ``crop_top_left`` ``(2, 2)``: SDXL micro-conditioning of the centre crop.
- ``ref_mse`` ``(F, K, 2)`` (optional, ``reference_draws`` K > 0): the reference errors e_ref(w), e_ref(l) of K fixed
  draws per pair (posterior sample, noise, timestep from the seed ``draw_seed(REFERENCE_SALT, seed, index, k)``,
  :func:`lora_dpo.data.draws.pair_draws`); training on draw k reuses that seed, then runs no reference forward, and full fine-tuning keeps no reference copy (TRL's ``precompute_ref_log_probs``).
- ``ok`` / ``skip_reason``: a row whose images failed to decode stays in place, marked, and is skipped (and counted)
  at training time exactly as the image path skips it.

What caching gives up: random crops (the crop is the centre one; ``data.random_crop`` is refused) and per-epoch
re-encoding; flips are kept by caching both. The cache is keyed (``cache.json``: model, the configs of its
denoiser, VAE, scheduler, text encoders and tokenizers, resolution, preprocessing, data set and filters, storage
dtype, reference draws; with reference errors also what they depend on: the reference, the seed, and for the flow
families the σ density and FLUX's guidance): a run whose recipe differs in any of these refuses a stale cache,
naming the keys that differ.

Storage dtype (``lora-dpo cache --dtype``): the VAE's by default (exact). ``bfloat16`` halves the disk of an fp32
VAE's posteriors; its 8-bit significand rounds each value by at most 2^-8 relative (round to nearest). Measured on
the tiny FLUX VAE (``tests/test_flow_tools.py::test_bfloat16_cache_error``): ‖Δ‖/‖x‖ = 1.7e-3 for the posterior mean
(``mean − shift_factor``) and for its std.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors.torch import load_file

from lora_dpo.data.draws import REFERENCE_SALT, TRAIN_SALT, draw_seed
from lora_dpo.data.pairs import ITEM_SALT, ExampleBatch, SkippedRow, preferred_then_rejected, split_skipped
from lora_dpo.errors import ModelLoadError
from lora_dpo.models.families import family_for_index
from lora_dpo.models.loading import read_model_index
from lora_dpo.models.policy import starting_lora
from lora_dpo.models.pretrained import is_hub_id

CACHE_VERSION = 4  # 2: keyed draws (lora_dpo.data.draws); 3: text conditioning once per caption; 4: component
# configs in the key, text keys in the manifest (SD3 / FLUX)
MANIFEST = "cache.json"
EMPTY_CAPTION = "empty_caption.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Key and manifest


def cache_key(cfg, reference_draws: int, storage_dtype: str) -> dict[str, Any]:
    """What a cache depends on; a run uses a cache only if its recipe gives the same key.

    Model (id or path, revision, variant, the hashes of its ``model_index.json`` and of its components' configs:
    denoiser, VAE, scheduler, text encoders, tokenizers, :func:`component_configs`), resolution and preprocessing,
    the data set and its filters, storage dtype, and for precomputed reference errors the reference itself (mode,
    precision, starting LoRA, loss type, seed, quantization) and the family's settings of the draws and the
    conditioning (:meth:`lora_dpo.models.families.base.ModelFamily.draw_key`: for SD3 / FLUX the σ density, for
    FLUX also the guidance scale its transformer is conditioned on).

    Raises:
        ModelLoadError: the model's ``model_index.json`` or a component's config cannot be read.
    """
    m, d = cfg.model, cfg.data
    index = read_model_index(m.pretrained_model_name_or_path, m.revision)
    key: dict[str, Any] = {
        "version": CACHE_VERSION, "model": m.pretrained_model_name_or_path, "revision": m.revision,
        "variant": m.variant, "model_index": _digest(index),
        "component_configs": _digest(component_configs(m.pretrained_model_name_or_path, m.revision, index)),
        "vae_dtype": m.vae_dtype,
        "mixed_precision": cfg.train.mixed_precision, "resolution": d.resolution, "random_flip": d.random_flip,
        "dataset": d.dataset, "split": d.split, "caption_column": d.caption_column,
        "image_columns": list(d.image_columns), "label_column": d.label_column, "drop_ties": d.drop_ties,
        "min_score_gap": d.min_score_gap, "max_pairs": d.max_pairs, "image_root": d.image_root,
        "are_different_column": d.are_different_column, "drop_duplicates": d.drop_duplicates,
        "drop_identical_images": d.drop_identical_images, "storage_dtype": storage_dtype,
        "reference_draws": reference_draws,
    }
    if reference_draws:
        key.update(mode=cfg.train.mode, reference=cfg.reference.model_dump(), init_from=_file_digest(starting_lora(cfg)),
                   seed=cfg.train.seed, prediction_type=m.prediction_type, quantization=m.quantization)
        key.update(family_for_index(index).draw_key(m))  # how the family draws t or σ and conditions on it
    return key


# Config files of a pipeline component, the first one present is read: models, schedulers, tokenizers.
_CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json")


def component_configs(name_or_path: str, revision: str | None, model_index: dict[str, Any]) -> dict[str, Any]:
    """``{component: config}`` of every component ``model_index`` lists (``unet`` / ``transformer``, ``vae``,
    ``scheduler``, ``text_encoder*``, ``tokenizer*``), read from its first file of :data:`_CONFIG_FILES` (a local
    folder, or the hub's copy through ``huggingface_hub``, which reads its local cache offline), without the keys
    that name where or by which library version it was saved (``_name_or_path``, ``_diffusers_version``,
    ``transformers_version``, ...: those starting with ``_`` and ending in ``_version``). A component without a
    config file maps to None.

    Raises:
        ModelLoadError: a hub file that exists but cannot be downloaded (network, authentication).
    """
    configs: dict[str, Any] = {}
    for component, spec in sorted(model_index.items()):
        if component.startswith("_") or not isinstance(spec, (list, tuple)) or spec[0] is None:
            continue
        configs[component] = None
        for file in _CONFIG_FILES:
            text = _read_config_file(name_or_path, revision, f"{component}/{file}")
            if text is not None:
                configs[component] = {k: v for k, v in json.loads(text).items()
                                      if not k.startswith("_") and not k.endswith("_version")}
                break
    return configs


def _read_config_file(name_or_path: str, revision: str | None, file: str) -> str | None:
    """The text of ``file`` in a local pipeline folder or hub repository; None when it has no such file."""
    if not is_hub_id(name_or_path):
        path = Path(name_or_path).expanduser() / file
        return path.read_text() if path.is_file() else None
    try:
        return Path(hf_hub_download(name_or_path, file, revision=revision)).read_text()
    except RemoteEntryNotFoundError:  # the repository has no such file (not: offline and not in the local cache)
        return None
    except Exception as exc:  # network, auth, offline without a copy: one clear message, as read_model_index gives
        raise ModelLoadError(f"could not read {file} of hub id '{name_or_path}' ({type(exc).__name__}: {exc}); "
                             "check the network / HF token, or pass a local pipeline folder") from exc


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path else None


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
class CachedBatch(ExampleBatch):
    """A micro-batch of B cached pairs; image-level tensors hold 2B rows, ALL preferred first (as PairBatch).

    latent_mean, latent_std: (2B, C, h, w) posterior, in the cache's storage dtype (the flip variant drawn).
    text: ``{"encoder_hidden_states": (B, L, D)}`` plus the family's pooled embedding ``(B, P)`` where it has one
    (SDXL ``text_embeds``, SD3 / FLUX ``pooled_projections``: the manifest's ``text_keys``), float32.
    ref_mse: (2B,) float32 precomputed reference errors of the draws ``draw_seeds`` give, or None.
    The fields of :class:`lora_dpo.data.pairs.ExampleBatch`: (2B, 2) conditioning rows; B indices and seeds (with
    precomputed reference errors, the seeds of the cached draws).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text: dict[str, torch.Tensor]
    ref_mse: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.indices)


class CachedPairDataset(torch.utils.data.Dataset):
    """Map-style dataset over a cache's rows, drawing per (seed, epoch, index) exactly what
    :class:`lora_dpo.data.pairs.PairDataset` draws (flip, caption dropout), so both paths see the same pairs.

    ``__getitem__`` returns a dict (or :class:`lora_dpo.data.pairs.SkippedRow` for a row that failed at cache time).
    With precomputed reference errors, epoch e uses draw ``e % K`` of each pair: its errors and its seed.
    """

    def __init__(self, cache_dir: str | Path, cfg, seed: int, manifest: dict | None = None) -> None:
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
        # (hidden, pooled) conditioning keys; caches of version 3 (SD1.5 / SDXL only) stored SDXL's pooled as text_embeds
        self.text_keys = self.manifest.get("text_keys", ["encoder_hidden_states", "text_embeds"])

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
            hidden_key, pooled_key = self.text_keys
            text = {hidden_key: _tensor(stored["hidden"], torch.float32, self.manifest["hidden_shape"])}
            if stored["pooled"]:
                text[pooled_key] = _tensor(stored["pooled"], torch.float32, self.manifest["pooled_shape"])
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
        return CachedBatch(latent_mean=torch.zeros(0), latent_std=torch.zeros(0), text={}, original_size=empty,
                           crop_top_left=empty.clone(), target_size=empty.clone(), indices=[], draw_seeds=[],
                           **extra)

    rows = {key: preferred_then_rejected(good, key) for key in
            ("latent_mean", "latent_std", "original_size", "crop_top_left", "target_size")}
    batch = CachedBatch(**rows, text={k: torch.stack([e["text"][k] for e in good]) for k in good[0]["text"]},
                        indices=[e["index"] for e in good], draw_seeds=[e["draw_seed"] for e in good], **extra)
    if "ref_mse" in good[0]:
        batch.ref_mse = preferred_then_rejected(good, "ref_mse")
    return batch
