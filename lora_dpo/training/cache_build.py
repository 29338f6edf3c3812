"""Building the latent cache (``lora-dpo cache``; its layout and key: :mod:`lora_dpo.data.cache`): the recipe's pairs
encoded once, shard by shard, and, with ``reference_draws``, the reference errors of fixed draws precomputed by the
policy's reference as training builds it (:func:`lora_dpo.training.setup.setup_policy`) and noised as training
noises (:func:`lora_dpo.training.steps.noised_latents`).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from lora_dpo.data.cache import (
    EMPTY_CAPTION,
    MANIFEST,
    STORAGE_DTYPES,
    cache_key,
    read_manifest,
)
from lora_dpo.data.draws import REFERENCE_SALT, draw_seed
from lora_dpo.data.pairs import PairDataset, SkippedRow, collate_pairs
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamedPairs
from lora_dpo.losses import per_sample_mse
from lora_dpo.models.loading import (
    DTYPES,
    encode_posterior,
    encode_prompts,
    load_components,
    predict,
    unet_conditioning,
)
from lora_dpo.models.lora_files import save_safetensors
from lora_dpo.training.run_folder import LOCK_FILE, RunLock
from lora_dpo.training.setup import recipe_family, setup_policy
from lora_dpo.training.steps import noised_latents

log = logging.getLogger(__name__)


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
            With ``data.streaming`` the source is read as a stream (:class:`lora_dpo.data.streaming.StreamedPairs`, no
            shuffle buffer: the rows, indices and key of the map-style build) and never converted to Arrow whole;
            the manifest keeps the stream position of the last finished shard.
        batch_size: pairs per VAE / text-encoder / UNet call.
        reference_draws: K > 0 also computes the reference errors of K fixed draws per pair (and flip variant).
        storage_dtype: of the latents (default: the VAE's dtype, which reproduces the image path exactly;
            ``float16`` / ``bfloat16`` halve the disk of an fp32 VAE's: bf16 rounds each value by at most 2^-8
            relative, see :mod:`lora_dpo.data.cache`). SD3 / FLUX store 16-channel posteriors and their T5 + CLIP
            text conditioning (``text_keys``); their reference errors are drawn from the recipe's σ density.
    Returns:
        The manifest (``cache.json``): key, shapes, counts, ``skipped`` by reason, seconds.
    Raises:
        ValueError: a recipe a cache cannot serve (random crops, KTO; caption dropout or SFT with ``reference_draws``),
            or ``out`` holds a cache built with another key (pass ``overwrite``).
        RunFolderLocked: another process is building into ``out`` (:class:`lora_dpo.training.run_folder.RunLock`).
    """
    _check_cacheable(cfg, reference_draws)
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    out = Path(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    recipe_family(cfg)  # the options the model's family takes, before the data or any weights
    stream, dataset, report, data_cfg = _open_pairs(cfg)
    with RunLock(out, command="cache"):  # one build per cache folder, taken before any model loads
        # as training loads it (the reference's source)
        unet_dtype = torch.float32 if cfg.train.mode == "full" else None
        components = load_components(cfg.model, weight_dtype, device, unet_dtype=unet_dtype,
                                     unet=bool(reference_draws))
        vae_dtype = next(components.vae.parameters()).dtype
        storage_dtype = storage_dtype or str(vae_dtype).removeprefix("torch.")
        key = cache_key(cfg, reference_draws, storage_dtype)
        manifest = _previous_manifest(out, key, overwrite)
        if manifest is not None and manifest.get("complete"):
            log.info("cache %s is complete (%d pairs)", out, manifest["pairs"])
            return manifest
        out.mkdir(parents=True, exist_ok=True)
        policy = None
        if reference_draws:  # in train mode, as in training (CPU kernels differ)
            _, policy, _ = setup_policy(cfg, device, components)
        empty = {k: v.float().cpu().contiguous() for k, v in encode_prompts(components, [""]).items()}
        save_safetensors({k: v[0] for k, v in empty.items()}, out / EMPTY_CAPTION)
        manifest = manifest or {
            "key": key, "complete": False, "pairs": len(dataset) if dataset is not None else None, "pairs_done": 0,
            "shards": [], "text_shards": [], "skipped": {}, "data_report": report,
            "scaling_factor": components.latent_scale, "family": components.family,
            "num_train_timesteps": components.noise_scheduler.config.num_train_timesteps,
        }
        _write_manifest(out, manifest)
        if stream is not None:
            if manifest.get("stream"):
                # just past the last pair of the last finished shard
                stream.load_state_dict(manifest["stream"])
            items = iter(stream)
        else:
            pairs = PairDataset(dataset, data_cfg, cfg.train.seed)
            items = (pairs[i] for i in range(manifest["pairs_done"], len(dataset)))
        encoder = _ShardEncoder(components, policy, cfg, reference_draws, STORAGE_DTYPES[storage_dtype],
                                weight_dtype, device, batch_size)
        for name in manifest["text_shards"]:  # resuming: the captions already stored keep their ids
            for caption in datasets.load_from_disk(str(out / name))["caption"]:
                encoder.caption_ids[caption] = len(encoder.caption_ids)
        _write_shards(out, items, encoder, manifest, stream, shard_size, progress)
        if stream is not None:
            manifest.update(pairs=manifest["pairs_done"], data_report={**stream.report(), "streaming": True})
        seconds = round(time.perf_counter() - started, 1) + manifest.get("seconds", 0)
        manifest.update(complete=True, seconds=seconds)
        _write_manifest(out, manifest)
        log.info("cache %s: %d pairs in %d shards, skipped %s", out, manifest["pairs"],
                 len(manifest["shards"]), manifest["skipped"])
        return manifest


def _check_cacheable(cfg, reference_draws: int) -> None:
    """Raises ValueError for a recipe a cache cannot serve (see :func:`build_cache`)."""
    if cfg.data.random_crop:
        raise ValueError("data.random_crop cannot be cached (the cache stores the centre crop): set it to false")
    if cfg.loss.unit == "images":
        raise ValueError(f"loss.type={cfg.loss.type} trains on labeled images, which the latent cache does not hold "
                         "yet: train it from the data set (no data.latent_cache)")
    if reference_draws and (cfg.data.caption_dropout or not cfg.loss.needs_reference):
        raise ValueError("precomputed reference errors need data.caption_dropout=0 and a loss with a reference "
                         f"(loss.type={cfg.loss.type})")


def _open_pairs(cfg):
    """The source, opened and checked before any weights load: ``(stream, dataset, report, data_cfg)``, the kept rows
    (map-style; ``stream`` None), or a stream of them (``data.streaming``: never converted or stored whole; the same
    rows in the same order, so the same indices; ``dataset`` and ``report`` None). ``data_cfg``: the data section
    without flips, caption dropout or shuffling (the cache stores both flips and the captions as they are)."""
    data_cfg = cfg.data.model_copy(update={"random_flip": False, "caption_dropout": 0.0, "shuffle_buffer": 0})
    if cfg.data.streaming:
        return StreamedPairs(data_cfg, cfg.train.seed), None, None, data_cfg
    dataset, report = load_preference_dataset(cfg.data)
    return None, dataset, report, data_cfg


def _previous_manifest(out: Path, key: dict[str, Any], overwrite: bool) -> dict | None:
    """The manifest of the cache already in ``out`` with the same key (complete, or to resume), or None. A cache built
    with another key is deleted with ``overwrite``, else refused (ValueError)."""
    if not (out / MANIFEST).is_file():
        return None
    manifest = read_manifest(out)
    if manifest["key"] != key:
        if not overwrite:
            raise ValueError(f"{out} holds a cache built for another recipe or options: pass --overwrite to replace "
                             "it, or choose another folder")
        for path in out.iterdir():  # all but the lock this build holds
            if path.name != LOCK_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    return manifest


def _write_shards(out: Path, items, encoder: _ShardEncoder, manifest: dict, stream, shard_size: int,
                  progress: bool) -> None:
    """Encode ``items`` a shard at a time (whatever the data size), each written with its new captions' text rows and
    recorded in the manifest (with the stream position when streaming) before the next one starts."""
    bar = tqdm(total=manifest["pairs"], initial=manifest["pairs_done"], desc="cache", unit="pair", disable=not progress)
    while chunk := list(itertools.islice(items, shard_size)):
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
                hidden_key, pooled_key = text_keys(text)
                self.shapes = {"latent_shape": list(variants[0][0].shape[1:]),
                               "hidden_shape": list(text[hidden_key].shape[1:]),
                               "pooled_shape": list(text[pooled_key].shape[1:]) if pooled_key else None,
                               "text_keys": [hidden_key, pooled_key]}
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
                    texts["hidden"].append(_bytes(text[hidden_key][j], torch.float32))
                    texts["pooled"].append(_bytes(text[pooled_key][j], torch.float32) if pooled_key else b"")
                columns["caption_id"].append(self.caption_ids[caption])
                columns["original_size"].append(batch.original_size[rows].flatten().tolist())
                columns["crop_top_left"].append(batch.crop_top_left[rows].flatten().tolist())
                columns["ref_mse"].append(_bytes(refs[:, :, rows], torch.float32) if refs is not None else b"")
            bar.update(len(items))
        return columns, texts


def text_keys(text: dict[str, torch.Tensor]) -> tuple[str, str | None]:
    """``(hidden, pooled)``: the keys of a family's text conditioning (:func:`lora_dpo.models.loading.encode_prompts`)
    the cache stores as ``hidden`` ``(L, D)`` and ``pooled`` ``(P,)`` per caption: ``encoder_hidden_states`` and the
    one other key (SDXL ``text_embeds``, SD3 / FLUX ``pooled_projections``), None where there is none (SD1.5).

    Raises:
        ValueError: a conditioning of another layout (no ``encoder_hidden_states``, or more than one other tensor),
            which the cache's two columns cannot hold.
    """
    others = sorted(k for k in text if k != "encoder_hidden_states")
    if "encoder_hidden_states" not in text or len(others) > 1:
        raise ValueError(f"the latent cache stores encoder_hidden_states and at most one pooled embedding per "
                         f"caption; this model's text conditioning has {sorted(text)}")
    return "encoder_hidden_states", (others[0] if others else None)


def _bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    return t.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()


@torch.no_grad()
def _reference_errors(components, policy, batch, text, variants, draws, seed, weight_dtype, device):
    """``(F, K, 2B)`` reference errors of the draws ``draw_seed(REFERENCE_SALT, seed, index, k)`` (preferred rows
    first), from the posteriors as stored, noised as the training step noises them; None without draws."""
    if not draws:
        return None
    cond = unet_conditioning(components, text, batch, weight_dtype)
    autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
    out = torch.empty(len(variants), draws, 2 * batch.num_pairs)
    for f, (mean, std) in enumerate(variants):
        for k in range(draws):
            seeds = [draw_seed(REFERENCE_SALT, seed, index, k) for index in batch.indices]
            noisy, target, timesteps = noised_latents(components, mean, std, seeds, True, weight_dtype)
            with policy.reference() as ref_unet, autocast:
                pred = predict(components, ref_unet, noisy, timesteps, cond)
            out[f, k] = per_sample_mse(pred, target).float().cpu()
    return out
