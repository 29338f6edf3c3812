"""The command line: validate, and bad input failing fast, before any weight loads."""

from pathlib import Path

import pytest

from lora_dpo.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes/sd15/lora_dpo.yaml")
CPU = "train.mixed_precision=no"  # the shipped recipes' fp16 needs a GPU: refused on a CPU-only machine


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers.CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


def test_validate_reports_without_loading_weights(tiny_sdxl, messy_pairs, no_weight_loading, capsys):
    path, expected = messy_pairs
    code = main(["validate", str(ROOT / "recipes/sdxl/lora_dpo.yaml"),
                 f"model.pretrained_model_name_or_path={tiny_sdxl}", f"data.dataset={path}", "data.resolution=32", CPU])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(sdxl)" in out and '"tie": 3' in out and "8 pairs × 2 accumulation × 1 processes = 16" in out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.nme=adamw"], "did you mean 'optim.name'"),
        (["train.batch_size=-1"], "train.batch_size=-1"),
        (["data.dataset=/no/such/data.parquet"], "/no/such/data.parquet"),
        (["model.pretrained_model_name_or_path=/no/such/model"], "neither an existing folder"),
        (["data.caption_column=prompt"], "prompt"),
    ],
)
def test_bad_input_fails_before_weights_load(overrides, message, tiny_sd15, photo_pairs, no_weight_loading,
                                             tmp_path, capsys):
    base = [f"model.pretrained_model_name_or_path={tiny_sd15}", f"data.dataset={photo_pairs}",
            f"output.dir={tmp_path / 'run'}", CPU]
    for command in ("validate", "train"):
        assert main([command, RECIPE, *base, *overrides]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_not_a_pipeline_folder(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert main(["validate", RECIPE, f"model.pretrained_model_name_or_path={tmp_path / 'model'}", CPU]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_validate_checks_the_starting_lora_without_loading_weights(tiny_sdxl, lora_sd15, messy_pairs,
                                                                  no_weight_loading, capsys):
    code = main(["validate", str(ROOT / "recipes/sdxl/lora_dpo.yaml"), f"model.pretrained_model_name_or_path={tiny_sdxl}",
                 f"data.dataset={messy_pairs[0]}", f"lora.init_from={lora_sd15}", CPU])
    assert code == 2 and "cross-attention width 32" in capsys.readouterr().err


def test_export_command(tiny_sd15, lora_sd15, tmp_path, capsys):
    import torch
    from test_train import _unet_inputs

    from lora_dpo.models.families import pipeline_class

    assert main(["export", str(lora_sd15), "--format", "kohya", "--out", str(tmp_path / "k")]) == 2
    assert "pass --base" in capsys.readouterr().err
    assert main(["export", str(lora_sd15), "--format", "kohya", "--out", str(tmp_path / "k.safetensors"),
                 "--base", str(tiny_sd15)]) == 0
    x, t, kw = _unet_inputs("sd15")
    outs = []
    for path in (lora_sd15, tmp_path / "k.safetensors"):
        pipe = pipeline_class("sd15").from_pretrained(tiny_sd15)
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            outs.append(pipe.unet(x, t, **kw).sample)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_generate_command(tiny_sd15, lora_sd15, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "samples"
    assert main(["generate", str(tiny_sd15), "a (red)1.3 cat", "--adapter", f"{lora_sd15}:0.7", "--seeds", "1", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    assert "4 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["base_p00_s1.png", "base_p00_s2.png", "grid.png",
                                                         "lora_p00_s1.png", "lora_p00_s2.png"]
    text = Image.open(out / "lora_p00_s2.png").text["parameters"]
    assert text.startswith("a (red)1.3 cat <lora:sd15:0.7>") and "Seed: 2" in text and "Steps: 2" in text


def test_validate_checks_a_cache_and_a_stream(tiny_sd15, photo_pairs, tmp_path, capsys):
    from lora_dpo.config import load_config
    from lora_dpo.training.cache_build import build_cache

    base = [f"model.pretrained_model_name_or_path={tiny_sd15}", f"data.dataset={photo_pairs}", "data.resolution=32",
            CPU]
    build_cache(load_config(RECIPE, base), tmp_path / "cache", progress=False)
    assert main(["validate", RECIPE, *base, f"data.latent_cache={tmp_path / 'cache'}"]) == 0
    assert '"latent_cache"' in capsys.readouterr().out
    assert main(["validate", RECIPE, *base[:2], CPU, "data.resolution=24", f"data.latent_cache={tmp_path / 'cache'}"]) == 2
    assert "resolution: cache 32, recipe 24" in capsys.readouterr().err
    assert main(["train", RECIPE, *base[:2], CPU, "data.resolution=24", f"data.latent_cache={tmp_path / 'cache'}",
                 f"output.dir={tmp_path / 'run'}"]) == 2  # a stale cache stops training before anything is written
    assert not (tmp_path / "run").exists()
    capsys.readouterr()
    assert main(["validate", RECIPE, *base, "data.streaming=true"]) == 0
    assert '"streaming": true' in capsys.readouterr().out
