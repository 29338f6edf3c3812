"""`lora-dpo generate`: compel prompt weighting, PNG metadata, seeds, adapters on/off, grid, bad arguments."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import save_random_lora
from PIL import Image

from lora_dpo.inference import generation as gen
from lora_dpo.inference import sampling
from lora_dpo.inference.grids import LABEL_HEIGHT, SIDE_WIDTH, grid_size, tile_size
from lora_dpo.models.loading import ModelLoadError
from lora_dpo.models.lora_files import AdapterMismatchError, UnsafeFileError

STEPS = 2


@pytest.fixture(params=["sd15", "sdxl"])
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family, tiny_sd15, tiny_sdxl):
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[family]


@pytest.fixture(scope="session")
def adapters(tiny_sd15, tiny_sdxl, tmp_path_factory) -> dict:
    """A LoRA adapter folder per family; seeded random A and B (std 0.3), so it visibly changes the images."""
    root = tmp_path_factory.mktemp("adapters")
    return {family: save_random_lora(root / f"style-{family}", tiny, family, r=4, lora_alpha=4, std=0.3, seed=1)
            for family, tiny in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl))}


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _files(report: dict, kind: str) -> list[str]:
    return [im["file"] for im in report["images"] if im["kind"] == kind]


def _run(tiny, out_dir, **kwargs) -> dict:
    kwargs = dict(dict(prompt="a red cat", seeds=[3, 5], num_inference_steps=STEPS, progress=False), **kwargs)
    return gen.generate(str(tiny), out_dir=out_dir, **kwargs)


def test_compel_weighting_and_blend(tiny):
    """Weights change the embeddings, weight 1.0 changes nothing, a blend is the weighted mean; a plain prompt
    gives exactly the pipeline's own encode_prompt embeddings (SDXL: two encoders, pooled from the second)."""
    pipe = sampling.load_pipeline(tiny)
    plain = gen.prompt_embeddings(pipe, "a red cat")
    up = gen.prompt_embeddings(pipe, "a (red)1.5 cat")
    same = gen.prompt_embeddings(pipe, "a (red)1.0 cat")
    assert not torch.equal(up["prompt_embeds"], plain["prompt_embeds"])
    assert torch.equal(same["prompt_embeds"], plain["prompt_embeds"])

    other = gen.prompt_embeddings(pipe, "a blue dog")
    blend = gen.prompt_embeddings(pipe, '("a red cat", "a blue dog").blend(0.7, 0.3)')
    expected = 0.7 * plain["prompt_embeds"] + 0.3 * other["prompt_embeds"]
    torch.testing.assert_close(blend["prompt_embeds"], expected)

    joined = gen.prompt_embeddings(pipe, '("a red cat", "a blue dog").and()', negative_prompt="ugly")
    assert joined["prompt_embeds"].shape[1] == 2 * plain["prompt_embeds"].shape[1]  # one 32-token chunk each
    assert joined["negative_prompt_embeds"].shape == joined["prompt_embeds"].shape  # negative padded to match

    width = pipe.unet.config.cross_attention_dim
    assert plain["prompt_embeds"].shape == (1, pipe.tokenizer.model_max_length, width)
    if hasattr(pipe, "text_encoder_2"):
        ref, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt("a red cat", device="cpu")
        assert plain["pooled_prompt_embeds"].shape == (1, pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(plain["pooled_prompt_embeds"], ref_pooled)
        assert not torch.equal(up["pooled_prompt_embeds"], torch.zeros_like(ref_pooled))
        assert torch.equal(plain["negative_pooled_prompt_embeds"], ref_neg_pooled)  # zeros: empty negative
    else:
        ref, ref_neg = pipe.encode_prompt("a red cat", "cpu", 1, True)
        assert "pooled_prompt_embeds" not in plain
    assert torch.equal(plain["prompt_embeds"], ref)
    assert torch.equal(plain["negative_prompt_embeds"], ref_neg)


def test_generate_writes_pngs_with_parameters(tiny, tmp_path):
    report = _run(tiny, tmp_path / "a", prompt=["a (red)1.3 cat", "a dog"], negative_prompt="blurry, dark")
    files = _files(report, "base")
    assert len(files) == 4 and all(f.endswith(".png") for f in files)
    assert json.loads((tmp_path / "a" / "generate.json").read_text())["images"] == report["images"]
    assert report["timings"]["total_s"] >= report["timings"]["load_s"] > 0

    image = Image.open(tmp_path / "a" / "base_p00_s5.png")
    text = image.text["parameters"]
    prompt, negative, settings = text.split("\n")
    assert prompt == "a (red)1.3 cat" and negative == "Negative prompt: blurry, dark"
    fields = dict(re.findall(r"(\w[\w ]*): (\"[^\"]*\"|[^,]+)", settings))
    assert fields["Seed"] == "5" and fields["Steps"] == str(STEPS) and fields["CFG scale"] == "7.5"
    assert fields["Size"] == f"{image.width}x{image.height}" and fields["Model"] == tiny.name
    params = json.loads(image.text["lora-dpo"])
    assert (params["prompt"], params["seed"], params["steps"]) == ("a (red)1.3 cat", 5, STEPS)
    assert params["negative_prompt"] == "blurry, dark" and params["adapters"] == []

    again = _run(tiny, tmp_path / "b", prompt="a (red)1.3 cat", negative_prompt="blurry, dark", seeds=[5])
    s3, s5 = _pixels(tmp_path / "a" / "base_p00_s3.png"), _pixels(tmp_path / "a" / "base_p00_s5.png")
    assert np.array_equal(_pixels(again["images"][0]["file"]), s5)  # same seed, another call: same pixels
    assert not np.array_equal(s3, s5)


def test_plain_prompt_matches_the_pipeline(tiny, tmp_path, capsys):
    """compel changes nothing for a plain prompt: the same pixels as ``pipe(prompt)`` with that seed."""
    report = _run(tiny, tmp_path, seeds=[7], progress=True)
    assert "generate: 100%" in capsys.readouterr().err  # the tqdm bar over images
    pipe = sampling.load_pipeline(tiny)
    direct = sampling.generate_images(pipe, ["a red cat"], [7], num_inference_steps=STEPS, guidance_scale=7.5)
    assert np.array_equal(_pixels(report["images"][0]["file"]), np.asarray(direct[0], dtype=np.int16))


def test_adapter_on_off_and_grid(family, tiny, adapters, tmp_path):
    none = _run(tiny, tmp_path / "none", prompt=["a red cat", "a dog"])
    both = _run(tiny, tmp_path / "lora", prompt=["a red cat", "a dog"], adapters=[(adapters[family], 1.0)])
    base, lora = _files(both, "base"), _files(both, "lora")
    assert len(base) == len(lora) == 4
    for b, plain in zip(base, _files(none, "base")):
        assert np.array_equal(_pixels(b), _pixels(plain))  # adapters off really is off
    for b, on in zip(base, lora):
        assert np.abs(_pixels(b) - _pixels(on)).mean() > 1

    image = Image.open(lora[0])
    first, settings = image.text["parameters"].split("\n")
    assert first == f"a red cat <lora:{adapters[family].name}:1>"
    hashes = json.loads(re.search(r"Lora hashes: (\"[^\"]*\")", settings).group(1))
    file_hash = gen.lora_hash(adapters[family] / "pytorch_lora_weights.safetensors")
    assert hashes == f"{adapters[family].name}: {file_hash[:12]}"
    params = json.loads(image.text["lora-dpo"])
    assert params["adapters_enabled"] and params["adapters"][0]["scale"] == 1.0
    assert "<lora:" not in Image.open(base[0]).text["parameters"]

    grid = Image.open(both["grid"])
    tile = tile_size(32)
    assert grid.size == grid_size(2, 2, tile)  # 2 prompts x (base row, lora row), one column per seed
    for row, files in ((0, base[:2]), (1, lora[:2])):  # first prompt's block: the images, enlarged
        for col, f in enumerate(files):
            x, y = SIDE_WIDTH + col * tile, LABEL_HEIGHT + row * tile
            crop = np.asarray(grid.crop((x, y, x + tile, y + tile)), dtype=np.int16)
            assert np.array_equal(crop, _pixels(f).repeat(tile // 32, 0).repeat(tile // 32, 1))

    only = _run(tiny, tmp_path / "only", prompt=["a red cat", "a dog"], adapters=[(adapters[family], 1.0)],
                grid=False)
    assert _files(only, "base") == [] and only["grid"] is None
    for a, b in zip(_files(only, "lora"), lora):  # the base pass left the adapter on, at its scale
        assert np.array_equal(_pixels(a), _pixels(b))


def test_scale_zero_equals_base(tiny_sd15, adapters, tmp_path):
    report = _run(tiny_sd15, tmp_path, adapters=[(adapters["sd15"], 0.0)])
    for b, on in zip(_files(report, "base"), _files(report, "lora")):
        assert np.array_equal(_pixels(b), _pixels(on))


def test_adapter_for_another_model_is_refused(tiny_sd15, adapters, tmp_path):
    with pytest.raises(AdapterMismatchError, match="does not fit this sd15 UNet"):
        _run(tiny_sd15, tmp_path, adapters=[(adapters["sdxl"], 1.0)])


def test_lora_disabled_restores_after_an_error():
    calls = []

    class Pipe:
        def disable_lora(self):
            calls.append("off")

        def enable_lora(self):
            calls.append("on")

    with pytest.raises(RuntimeError), gen.lora_disabled(Pipe()):
        raise RuntimeError("boom")
    assert calls == ["off", "on"]


@pytest.mark.parametrize("name", gen.SCHEDULER_NAMES)
def test_schedulers(name, tiny_sd15, tmp_path):
    report = _run(tiny_sd15, tmp_path, seeds=[0], scheduler=name)
    expected = "DDPMScheduler" if name == "default" else gen.SCHEDULERS[name][0]
    assert report["scheduler_class"] == expected
    assert report["schedule_type"] == ("Karras" if name.endswith("karras") else None)
    assert _pixels(report["images"][0]["file"]).std() > 0


@pytest.mark.parametrize("change, error, match", [
    (dict(scheduler="eular_a"), ValueError, "did you mean 'euler_a'"),
    (dict(scheduler="DPM++"), ValueError, "choose one of default, ddim"),
    (dict(adapters=[("missing.safetensors", 1.0)]), FileNotFoundError, "not found"),
    (dict(adapters=[("adapter.bin", 1.0)]), UnsafeFileError, "not a safetensors file"),
    (dict(adapters=[("x.safetensors",)]), ValueError, r"\(path, scale\) pairs"),
    (dict(seeds=[1, 1]), ValueError, "distinct"),
    (dict(seeds=[-1]), ValueError, "seeds must be"),
    (dict(height=30), ValueError, "multiples of 8"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(dtype="float8"), ValueError, "dtype"),
    (dict(prompt='("a", "b").blend(1, 2, 3)'), ValueError, "compel syntax"),
    (dict(model="missing"), ModelLoadError, "neither an existing folder"),
])
def test_bad_arguments_fail_before_loading(change, error, match, tiny_sd15, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_pipeline called before the arguments were checked")

    monkeypatch.setattr(sampling, "load_pipeline", refuse)
    monkeypatch.chdir(tmp_path)  # relative adapter paths: adapter.bin exists, missing.safetensors does not
    torch.save({"w": torch.zeros(1)}, tmp_path / "adapter.bin")
    kwargs = dict(model=str(tiny_sd15), prompt="a cat", out_dir=tmp_path / "out", progress=False)
    with pytest.raises(error, match=match):
        gen.generate(**dict(kwargs, **change))
    assert not (tmp_path / "out").exists()
