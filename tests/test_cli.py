"""The command line: validate, and bad input failing fast, before any weight loads."""

from pathlib import Path

import pytest

from lora_dpo.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes/sd15/lora_dpo.yaml")


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
                 f"model.pretrained_model_name_or_path={tiny_sdxl}", f"data.dataset={path}", "data.resolution=32"])
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
            f"output.dir={tmp_path / 'run'}"]
    for command in ("validate", "train"):
        assert main([command, RECIPE, *base, *overrides]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_not_a_pipeline_folder(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert main(["validate", RECIPE, f"model.pretrained_model_name_or_path={tmp_path / 'model'}"]) == 2
    assert "no model_index.json" in capsys.readouterr().err
