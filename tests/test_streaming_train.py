"""Training from a streamed data set (``data.streaming``): the same pairs as the map-style path, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import ROOT, _args, _metrics

from lora_dpo.config import load_config
from lora_dpo.training.recipe import train


def _run(model, data, out, *extra):
    return train(load_config(ROOT / "recipes/sd15/lora_dpo.yaml", _args(model, data, out, *extra)))


def _reset():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def test_streaming_run_matches_the_map_style_run_and_resumes_exactly(tiny_sd15, photo_pairs, tmp_path):
    common = ("train.max_steps=4", "train.checkpoint_every=2", "data.shuffle_buffer=0")
    # One process, no shuffle buffer: a streamed epoch is the data set in file order, the map-style sampler shuffles,
    # so compare the streamed run with itself across a resume, and its report with the map-style one.
    _run(tiny_sd15, photo_pairs, tmp_path / "straight", "data.streaming=true", *common)
    _reset()
    _run(tiny_sd15, photo_pairs, tmp_path / "split", "data.streaming=true", *common[1:], "train.max_steps=2")
    _reset()
    _run(tiny_sd15, photo_pairs, tmp_path / "split", "data.streaming=true", *common, "train.resume_from=latest")
    a, b = (load_file(tmp_path / x / "pytorch_lora_weights.safetensors") for x in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(tmp_path / "straight")] == [r["loss"] for r in _metrics(tmp_path / "split")]
    assert len({r["loss"] for r in _metrics(tmp_path / "straight")}) > 2
    state = json.loads((tmp_path / "split/checkpoints/step_2/trainer_state.json").read_text())
    assert "stream" in state

    report = json.loads((tmp_path / "straight/data_report.json").read_text())
    assert report["streaming"] and not report["complete"] and report["kept"] == 8  # 4 steps × 2 pairs read so far

    # A run over more than one epoch reports the whole first pass: the counts of the map-style loader.
    _reset()
    _run(tiny_sd15, photo_pairs, tmp_path / "epoch", "data.streaming=true", "train.max_steps=22",
         "train.checkpoint_every=100")
    _reset()
    _run(tiny_sd15, photo_pairs, tmp_path / "mapped", "train.max_steps=1")
    streamed = json.loads((tmp_path / "epoch/data_report.json").read_text())
    mapped = json.loads((tmp_path / "mapped/data_report.json").read_text())
    assert streamed["complete"] and _metrics(tmp_path / "epoch")[-1]["epoch"] == 1
    assert streamed["kept"] == mapped["kept"] and streamed["skipped"] == mapped["skipped"] and mapped["skipped"]


def test_streaming_with_too_little_data_fails_clearly(tiny_sd15, photo_pairs, tmp_path):
    with pytest.raises(ValueError, match="batch"):
        _run(tiny_sd15, photo_pairs, tmp_path / "run", "data.streaming=true", "data.max_pairs=1")
