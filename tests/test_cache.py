"""The latent cache: training from it reproduces training from the images, stale caches are refused, an interrupted
build resumes, and precomputed reference errors equal the on-the-fly reference pass."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_train import ROOT, _metrics

from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.data.cache import CachedPairDataset, check_cache, collate_cached, read_manifest
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.training.cache_build import build_cache
from lora_dpo.training.recipe import train
from lora_dpo.training.setup import setup_policy
from lora_dpo.training.steps import dpo_micro_step


def _cfg(family, model, data, out, *extra):
    return load_config(ROOT / f"recipes/{family}/lora_dpo.yaml", [
        f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", "data.resolution=32",
        f"output.dir={out}", "train.batch_size=2", "train.max_steps=4", "optim.name=adamw", "optim.lr=1e-3",
        "optim.lr_scheduler=constant", "output.tensorboard=false", "train.mixed_precision=no",
        "train.gradient_checkpointing=false", "data.caption_dropout=0.3", *extra])


def _interrupt_build(cfg, out, shard: str, monkeypatch) -> None:
    """Build a cache of 10-pair shards into ``out`` and stop it (KeyboardInterrupt) as it writes ``shard``."""
    import datasets

    save = datasets.Dataset.save_to_disk

    def crash(self, path, *args, **kwargs):
        if shard in str(path):
            raise KeyboardInterrupt
        return save(self, path, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(datasets.Dataset, "save_to_disk", crash)
        build_cache(cfg, out, shard_size=10, progress=False)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_from_the_cache_reproduces_the_image_run(family, request, photo_pairs, tmp_path):
    """Same pairs, flips (both cached), caption dropouts, posterior samples, noise and timesteps: the runs agree up to
    the float rounding of encoding pairs in other batch groupings (here < 1e-3 in the loss at β 5000)."""
    model = request.getfixturevalue(f"tiny_{family}")
    cfg = _cfg(family, model, photo_pairs, tmp_path / "images")
    manifest = build_cache(cfg, tmp_path / "cache", shard_size=7, progress=False)
    assert manifest["complete"] and manifest["pairs"] == json.loads(
        (tmp_path / "cache" / "cache.json").read_text())["data_report"]["kept"]
    train(cfg)
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    cached = _cfg(family, model, photo_pairs, tmp_path / "cached", f"data.latent_cache={tmp_path / 'cache'}")
    result = train(cached)
    assert result.policy.unet is not None and json.loads((tmp_path / "cached" / "data_report.json").read_text())[
        "latent_cache"] == str(tmp_path / "cache")
    a, b = _metrics(tmp_path / "images"), _metrics(tmp_path / "cached")
    assert a[0]["loss"] == b[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-3)
        assert ra["mse/chosen"] == pytest.approx(rb["mse/chosen"], rel=1e-4)
    assert len({round(r["loss"], 3) for r in a}) > 2  # the run moved: the agreement is not trivial
    wa, wb = (load_file(tmp_path / x / "pytorch_lora_weights.safetensors") for x in ("images", "cached"))
    assert max((wa[k] - wb[k]).abs().max() for k in wa) < 2e-3 < max(wa[k].abs().max() for k in wa)


def test_the_cache_is_keyed_and_resumable(tiny_sd15, photo_pairs, tmp_path, monkeypatch):
    cfg = _cfg("sd15", tiny_sd15, photo_pairs, tmp_path / "run")
    import diffusers

    with monkeypatch.context() as patch:  # without reference errors the UNet is not needed, and not loaded
        patch.setattr(diffusers.UNet2DConditionModel, "from_pretrained",
                      classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("UNet loaded"))))
        straight = build_cache(cfg, tmp_path / "straight", shard_size=10, progress=False)

    _interrupt_build(cfg, tmp_path / "split", "shard_00001", monkeypatch)
    with pytest.raises(ValueError, match="incomplete"):
        check_cache(cfg, tmp_path / "split")
    resumed = build_cache(cfg, tmp_path / "split", shard_size=10, progress=False)
    assert resumed["shards"] == straight["shards"] and resumed["pairs_done"] == straight["pairs"]
    a, b = (CachedPairDataset(tmp_path / x, cfg.data, 0) for x in ("straight", "split"))
    assert len(a) == len(b) == straight["pairs"]
    for i in range(len(a)):
        assert torch.equal(a[i]["latent_mean"], b[i]["latent_mean"])

    stale = _cfg("sd15", tiny_sd15, photo_pairs, tmp_path / "run", "data.resolution=24")
    with pytest.raises(ValueError, match="resolution: cache 32, recipe 24"):
        check_cache(stale, tmp_path / "straight")
    with pytest.raises(ValueError, match="--overwrite"):
        build_cache(stale, tmp_path / "straight", progress=False)
    with pytest.raises(ValueError, match="random_crop"):
        check_cache(_cfg("sd15", tiny_sd15, photo_pairs, tmp_path / "run", "data.random_crop=true"),
                    tmp_path / "straight")


def test_a_cache_built_from_a_stream_equals_the_map_style_one(tiny_sd15, photo_pairs, tmp_path, monkeypatch):
    """data.streaming: the source is read as it goes (never converted to Arrow whole); the same rows, indices and
    encodings as the map-style build, and an interrupted streamed build resumes from the stream position."""
    cfg = _cfg("sd15", tiny_sd15, photo_pairs, tmp_path / "run")
    mapped = build_cache(cfg, tmp_path / "mapped", shard_size=10, progress=False)
    streamed_cfg = _cfg("sd15", tiny_sd15, photo_pairs, tmp_path / "run", "data.streaming=true",
                        "data.shuffle_buffer=64")  # a training shuffle buffer: the cache keeps the source order
    _interrupt_build(streamed_cfg, tmp_path / "streamed", "shard_00002", monkeypatch)
    partial = read_manifest(tmp_path / "streamed")
    assert partial["pairs_done"] == 20 and partial["pairs"] is None and "stream" in partial
    streamed = build_cache(streamed_cfg, tmp_path / "streamed", shard_size=10, progress=False)
    assert streamed["pairs"] == mapped["pairs"] and streamed["skipped"] == mapped["skipped"]
    assert streamed["shards"] == mapped["shards"]
    assert streamed["data_report"]["kept"] == mapped["data_report"]["kept"] == mapped["pairs"]
    check_cache(cfg, tmp_path / "streamed")  # the same key: either recipe trains from either cache
    a, b = (CachedPairDataset(tmp_path / x, cfg.data, 0) for x in ("mapped", "streamed"))
    assert a.rows["index"] == b.rows["index"] == list(range(len(a)))
    assert a.rows["latents"] == b.rows["latents"] and a.rows["caption_id"] == b.rows["caption_id"]
    assert a.texts["caption"] == b.texts["caption"] and a.texts["hidden"] == b.texts["hidden"]
    # each distinct caption's conditioning is stored once, and every pair finds its own
    captions = load_preference_dataset(cfg.data)[0]["caption"]
    assert sorted(a.texts["caption"]) == sorted(set(captions)) and len(a.texts) < len(a)
    assert all(a.texts["caption"][c] == captions[i] for i, c in enumerate(a.rows["caption_id"]) if c >= 0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_precomputed_reference_equals_the_reference_pass(mode, tiny_sd15, photo_pairs, tmp_path):
    """Same fixed draw: the stored e_ref gives the loss and gradients of an on-the-fly reference pass, bit for bit.

    Why exact: the build encodes pairs 0-3 in one call of 4 pairs (``batch_size=4``), the micro-batch compared here,
    so the reference pass runs on the same values (the cached posteriors and text are the bytes of the build's
    tensors) in the same shapes, hence the same CPU kernels in the same order: the same bits. A build that groups the
    pairs otherwise (the default 8 pairs per call) blocks the convolutions differently and rounds e_ref differently
    in its last bit (measured: 1.2e-7 = 1 ulp of e_ref ~ 1); the loss moves by up to 0.5·β·(|Δe_w| + |Δe_l|), i.e.
    6e-4 at β 5000 (seen: 2e-6 to 6e-4, with the LoRA's random start), so no fixed tolerance would be safe.
    """
    cfg = _cfg("sd15", tiny_sd15, photo_pairs, tmp_path / "run", "data.caption_dropout=0", f"train.mode={mode}")
    build_cache(cfg, tmp_path / "cache", shard_size=100, reference_draws=2, progress=False, batch_size=4)
    manifest = check_cache(cfg, tmp_path / "cache")
    pairs = CachedPairDataset(tmp_path / "cache", cfg.data, cfg.train.seed, manifest)
    pairs.set_epoch(1)  # draw 1 of 2
    batch = collate_cached([pairs[i] for i in range(4)])
    assert batch.ref_mse.shape == (8,)
    pairs.set_epoch(2)  # draw 0 again: other seeds, other stored errors
    other = collate_cached([pairs[i] for i in range(4)])
    assert set(other.draw_seeds).isdisjoint(batch.draw_seeds) and not torch.equal(other.ref_mse, batch.ref_mse)

    class Acc:
        device = torch.device("cpu")

        def autocast(self):
            from contextlib import nullcontext

            return nullcontext()

    components, policy, dtype = setup_policy(cfg, "cpu")
    with torch.no_grad():  # move the policy away from the reference, so the comparison is not at u = 0
        g = torch.Generator().manual_seed(0)
        for p in policy.params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    results = []
    for stored in (batch.ref_mse, None):
        for p in policy.params:
            p.grad = None
        loss, metrics = dpo_micro_step(components, policy.unet, policy.reference,
                                       type(batch)(**{**batch.__dict__, "ref_mse": stored}), cfg.loss, Acc(), dtype)
        loss.mean().backward()
        results.append((loss.detach(), [p.grad.clone() for p in policy.params], metrics["ref_mse/chosen"]))
    (l1, g1, r1), (l2, g2, r2) = results
    assert l1.abs().max() > 0.01 and not torch.allclose(l1, torch.full_like(l1, math.log(2)))
    assert torch.equal(r1, r2) and torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2)) and max(a.abs().max() for a in g1) > 1e-6


def test_full_mode_from_precomputed_reference_keeps_no_copy(tiny_sd15, photo_pairs, tmp_path, capsys):
    cfg_args = ["data.caption_dropout=0", "train.mode=full", "optim.lr=1e-5"]
    cfg = _cfg("sd15", tiny_sd15, photo_pairs, tmp_path / "run", *cfg_args)
    assert main(["cache", str(ROOT / "recipes/sd15/lora_dpo.yaml"), *[f"{k}" for k in _overrides(cfg, cfg_args)],
                 "--out", str(tmp_path / "cache"), "--reference-draws", "1", "--shard-size", "16"]) == 0
    assert "data.latent_cache=" in capsys.readouterr().out
    result = train(_cfg("sd15", tiny_sd15, photo_pairs, tmp_path / "run", *cfg_args,
                        f"data.latent_cache={tmp_path / 'cache'}"))
    assert result.policy.frozen_reference is None  # no reference copy in memory
    first = _metrics(tmp_path / "run")[0]
    # The stored e_ref is the untrained policy's error, computed in other batch groupings: ln 2 up to that rounding
    # (|u| ~ 1e-4 at β 5000); an e_ref of another model would be off by orders of magnitude more.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and abs(first["rewards/margins"]) < 1e-3
    with pytest.raises(RuntimeError, match="without a reference"):
        with result.policy.reference():
            pass


def _overrides(cfg, extra):
    m, d = cfg.model, cfg.data
    return [f"model.pretrained_model_name_or_path={m.pretrained_model_name_or_path}", f"data.dataset={d.dataset}",
            "data.resolution=32", "train.mixed_precision=no", "train.gradient_checkpointing=false", *extra]
