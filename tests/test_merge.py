"""``lora-dpo merge``: the merged pipeline computes what the adapter-loaded pipeline computes, and opens alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_train import _unet_inputs

from lora_dpo.cli import main
from lora_dpo.export.merge import merge_adapter
from lora_dpo.models.families import pipeline_class
from lora_dpo.models.lora_files import AdapterMismatchError, UnsafeFileError

TOLERANCE = 1e-5  # fp32: max |merged - adapter-loaded| of the UNet output (outputs are O(1))


def _unet_out(unet, family):
    x, t, kw = _unet_inputs(family)
    with torch.no_grad():
        return unet(x, t, **kw).sample


def _image(pipe):
    out = pipe("a red cat", num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return out.images[0]


@pytest.mark.parametrize("family,scale", [("sd15", 1.0), ("sd15", 0.5), ("sdxl", 1.0)])
def test_merged_pipeline_matches_the_adapter(family, scale, request, tmp_path):
    model, lora = request.getfixturevalue(f"tiny_{family}"), request.getfixturevalue(f"lora_{family}")
    report = merge_adapter(str(model), lora, tmp_path / "merged", scale=scale)
    assert report["modules"] > 0 and report["family"] == family

    cls = pipeline_class(family)
    merged = cls.from_pretrained(tmp_path / "merged")  # nothing else needed: no adapter, no PEFT
    assert not getattr(merged.unet, "peft_config", None)
    loaded = cls.from_pretrained(model)
    base_out = _unet_out(loaded.unet, family)
    loaded.load_lora_weights(lora, adapter_name="x")
    loaded.set_adapters(["x"], [scale])
    want, got = _unet_out(loaded.unet, family), _unet_out(merged.unet, family)
    assert (want - base_out).abs().max() > 1000 * TOLERANCE  # the adapter matters at this scale
    assert (got - want).abs().max() < TOLERANCE
    assert np.abs(_image(merged) - _image(loaded)).max() < 1e-4  # whole pipeline, same seed

    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.data.base_model == str(model) and card.data.base_model_relation == "merge"


def test_unet_only_and_half_precision(tiny_sd15, lora_sd15, tmp_path):
    merge_adapter(str(tiny_sd15), lora_sd15, tmp_path / "full")
    merge_adapter(str(tiny_sd15), lora_sd15, tmp_path / "unet", unet_only=True, dtype="bfloat16")
    UNet2DConditionModel.from_pretrained(tmp_path / "unet")  # opens as a UNet folder
    half = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    full = load_file(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors")
    assert half.keys() == full.keys()
    for name, a in full.items():
        assert half[name].dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), half[name]), name


def test_merge_refuses_bad_input_before_loading(tiny_sd15, tiny_sdxl, lora_sd15, tmp_path, monkeypatch, capsys):
    import diffusers

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    for cls in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_pretrained", no_loading)
    with pytest.raises(AdapterMismatchError, match="cross-attention width"):
        merge_adapter(str(tiny_sdxl), lora_sd15, tmp_path / "a")
    pickle = tmp_path / "lora.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    with pytest.raises(UnsafeFileError, match="arbitrary code"):
        merge_adapter(str(tiny_sd15), pickle, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep me")
    assert main(["merge", str(tiny_sd15), str(lora_sd15), str(tmp_path / "c")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "c" / "x").read_text() == "keep me"


def test_merging_a_kohya_file_gives_the_same_weights(tiny_sdxl, lora_sdxl, tmp_path):
    """An AUTOMATIC1111 / ComfyUI file (SDXL input_blocks names) merges to the same UNet as the diffusers file."""
    from lora_dpo.export.formats import export_adapter

    kohya = export_adapter(lora_sdxl, tmp_path / "style.safetensors", "kohya", "sdxl", tiny_sdxl)
    merge_adapter(str(tiny_sdxl), lora_sdxl, tmp_path / "a", unet_only=True)
    merge_adapter(str(tiny_sdxl), kohya, tmp_path / "b", unet_only=True)
    a, b = (load_file(tmp_path / x / "diffusion_pytorch_model.safetensors") for x in "ab")
    base = load_file(tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors")
    assert sum(not torch.equal(a[k], base[k]) for k in a) > 0
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
