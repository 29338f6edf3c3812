"""DPO on top of an existing LoRA (``lora.init_from``): the reference is that LoRA, frozen, also across resume."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import ROOT, _args, _metrics, _unet_inputs

from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.models.adapters import ADAPTER_NAME, REFERENCE_ADAPTER
from lora_dpo.models.families import pipeline_class
from lora_dpo.models.lora_files import UnsafeFileError
from lora_dpo.models.policy import REFERENCE_LORA_FILE
from lora_dpo.training.recipe import train


def _run(model, data, out, *extra):
    cfg = load_config(ROOT / "recipes/sd15/lora_dpo.yaml", _args(model, data, out, *extra))
    return train(cfg)


@pytest.fixture(scope="module")
def start_lora(tiny_sd15, photo_pairs, tmp_path_factory):
    """A LoRA trained 3 steps at a high learning rate: clearly not the base model (rank 4, alpha 2)."""
    out = tmp_path_factory.mktemp("start") / "run"
    _run(tiny_sd15, photo_pairs, out, "lora.r=4", "lora.lora_alpha=2", "optim.lr=3e-2")
    return out


def _unet_out(unet, family="sd15"):
    x, t, kw = _unet_inputs(family)
    with torch.no_grad():
        return unet(x, t, **kw).sample


def test_policy_starts_from_the_lora_and_the_reference_is_it(tiny_sd15, photo_pairs, start_lora, tmp_path):
    pipe = pipeline_class("sd15").from_pretrained(tiny_sd15)
    base = _unet_out(pipe.unet)
    pipe.load_lora_weights(start_lora)
    with_start = _unet_out(pipe.unet)
    assert (with_start - base).abs().max() > 1e-3  # the starting LoRA changes the model

    out = tmp_path / "run"
    result = _run(tiny_sd15, photo_pairs, out, f"lora.init_from={start_lora}", "lora.r=16")
    first = _metrics(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
    assert first["ref_mse/chosen"] == first["mse/chosen"]

    unet = result.policy.unet
    assert result.policy.reference_adapter == REFERENCE_ADAPTER
    assert unet.peft_config[ADAPTER_NAME].r == 4  # the file's rank wins over lora.r
    with result.policy.reference() as ref:  # the reference computes the starting LoRA, not the base
        assert torch.allclose(_unet_out(ref), with_start, atol=1e-5)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if f".{REFERENCE_ADAPTER}." in n)
    assert all(p.requires_grad for n, p in unet.named_parameters() if f".lora_B.{ADAPTER_NAME}." in n)

    start = load_file(start_lora / "pytorch_lora_weights.safetensors")
    trained = load_file(out / "pytorch_lora_weights.safetensors")
    assert trained.keys() == start.keys()  # the export has the starting LoRA's shape and loads on the base alone
    assert max((trained[k] - start[k]).abs().max() for k in start) > 1e-4
    assert load_file(out / REFERENCE_LORA_FILE).keys() == start.keys()
    tuned = pipeline_class("sd15").from_pretrained(tiny_sd15)
    tuned.load_lora_weights(out)
    with result.policy.reference():
        pass  # leaving the block restores the trained adapter
    assert torch.allclose(_unet_out(tuned.unet), _unet_out(unet), atol=1e-5)


def test_resume_keeps_the_reference_even_if_the_file_changes(tiny_sd15, photo_pairs, start_lora, tmp_path, caplog):
    start = tmp_path / "start"
    shutil.copytree(start_lora, start, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    common = (f"lora.init_from={start}", "train.max_steps=4", "train.checkpoint_every=2")
    _run(tiny_sd15, photo_pairs, tmp_path / "straight", *common)
    _run(tiny_sd15, photo_pairs, tmp_path / "split", *common[:1], "train.max_steps=2", "train.checkpoint_every=2")
    weights = start / "pytorch_lora_weights.safetensors"  # the original changes between the two halves
    shutil.copyfile(tmp_path / "straight" / "pytorch_lora_weights.safetensors", weights)
    _run(tiny_sd15, photo_pairs, tmp_path / "split", *common, "train.resume_from=latest")
    assert "changed since the run started" in caplog.text
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(tmp_path / "straight")] == [r["loss"] for r in _metrics(tmp_path / "split")]


def test_bad_starting_lora_fails_before_weights_load(tiny_sd15, tiny_sdxl, photo_pairs, start_lora, tmp_path, capsys):
    pickle = tmp_path / "lora.bin"
    torch.save(load_file(start_lora / "pytorch_lora_weights.safetensors"), pickle)
    recipe = str(ROOT / "recipes/sd15/lora_dpo.yaml")
    assert main(["train", recipe, *_args(tiny_sd15, photo_pairs, tmp_path / "a", f"lora.init_from={pickle}")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "a" / "checkpoints").exists()
    assert main(["train", recipe, *_args(tiny_sd15, photo_pairs, tmp_path / "b", f"lora.init_from={start_lora}",
                                         "train.mode=full")]) == 2
    assert "lora-dpo merge" in capsys.readouterr().err
    # an SD1.5 LoRA as the start of an SDXL run: a clear message, not a shape error
    assert main(["train", str(ROOT / "recipes/sdxl/lora_dpo.yaml"),
                 *_args(tiny_sdxl, photo_pairs, tmp_path / "c", f"lora.init_from={start_lora}")]) == 2
    assert "cross-attention width" in capsys.readouterr().err
    with pytest.raises(UnsafeFileError):
        _run(tiny_sd15, photo_pairs, tmp_path / "d", f"lora.init_from={pickle}")


def test_implicit_reward_is_measured_against_the_starting_lora(tiny_sd15, photo_pairs, start_lora, tmp_path):
    """A run that barely moved from its starting LoRA has implicit rewards ~0; against the base model they would
    be the starting LoRA's own, far from 0."""
    from lora_dpo.evaluation.implicit_reward import implicit_reward_accuracy

    out = tmp_path / "run"
    _run(tiny_sd15, photo_pairs, out, f"lora.init_from={start_lora}", "optim.lr=1e-12", "train.max_steps=1")
    cfg = load_config(out / "recipe.yaml")
    moved = implicit_reward_accuracy(out, cfg, photo_pairs, draws=1, max_pairs=6)
    start = implicit_reward_accuracy(start_lora, load_config(start_lora / "recipe.yaml"), photo_pairs, draws=1,
                                     max_pairs=6)
    assert abs(start["margin_mean"]) + start["margin_std"] > 0.1
    assert abs(moved["margin_mean"]) + moved["margin_std"] < 1e-3 * (abs(start["margin_mean"]) + start["margin_std"])


def test_starting_from_a_kohya_file(tiny_sd15, photo_pairs, start_lora, tmp_path):
    """An AUTOMATIC1111 / ComfyUI file (kohya keys, per-module .alpha) starts a run just as well."""
    from lora_dpo.export.formats import export_adapter

    kohya = export_adapter(start_lora, tmp_path / "style.safetensors", "kohya", "sd15")
    pipe = pipeline_class("sd15").from_pretrained(tiny_sd15)
    pipe.load_lora_weights(start_lora)
    with_start = _unet_out(pipe.unet)
    result = _run(tiny_sd15, photo_pairs, tmp_path / "run", f"lora.init_from={kohya}", "train.max_steps=1")
    assert _metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with result.policy.reference() as ref:
        assert torch.allclose(_unet_out(ref), with_start, atol=1e-5)


def test_text_encoder_part_of_a_starting_lora_is_reported(tiny_sd15, photo_pairs, start_lora, tmp_path, caplog):
    from safetensors.torch import save_file

    from lora_dpo.models.lora_files import read_lora_file

    tensors, metadata = read_lora_file(start_lora)
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    tensors.update({f"{te}.lora_A.weight": torch.randn(4, 32), f"{te}.lora_B.weight": torch.randn(32, 4)})
    save_file(tensors, tmp_path / "with_te.safetensors", metadata=metadata)
    _run(tiny_sd15, photo_pairs, tmp_path / "run", f"lora.init_from={tmp_path / 'with_te.safetensors'}",
         "train.max_steps=1")
    assert "text-encoder LoRA weights" in caplog.text
    assert _metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert not any(k.startswith("text_encoder") for k in load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
