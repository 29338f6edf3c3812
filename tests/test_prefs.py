"""Seeded batched sampling, and preference sets labelled by a scorer (Pick-a-Pic parquet, the `prefs` command)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lora_dpo.cli import main
from lora_dpo.config import DataConfig
from lora_dpo.data import load_preference_dataset
from lora_dpo.prefs import build_preference_set, pair_seeds
from lora_dpo.prompts import digit_caption
from lora_dpo.sampling import generate_images
from lora_dpo.scorers import JpegCompressibilityScorer

STEPS = 2  # sampler steps: enough to exercise the loop, cheap on a CPU
PROMPTS = [digit_caption(3), digit_caption(8)]


@pytest.fixture(scope="module")
def pipe(tiny_sd15):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)


class TieOnPrompt:
    """JPEG reward, except that both images of every pair of ``tie_prompt`` get the same score (a tie)."""

    name = "tie_stub"

    def __init__(self, tie_prompt: str) -> None:
        self.tie_prompt = tie_prompt

    def score(self, images, prompts):
        jpeg = JpegCompressibilityScorer().score(images, prompts)
        return np.where([p == self.tie_prompt for p in prompts], -1.0, jpeg)


class FakePipe:
    """Stands in for a diffusers pipeline: each image is drawn from its own generator only (exact arithmetic)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def set_progress_bar_config(self, **kwargs) -> None:
        self.progress = kwargs

    def __call__(self, prompt, generator, output_type, **kwargs):
        assert isinstance(generator, list) and len(generator) == len(prompt) and output_type == "pil"
        self.calls.append(len(prompt))
        images = []
        for p, g in zip(prompt, generator):
            noise = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
            images.append(Image.fromarray(noise ^ np.uint8(len(p))))
        return SimpleNamespace(images=images)


# ----------------------------------------------------------------------------------------------------------
# sampling


def test_seeding_is_per_image_exactly():
    """The seeding logic: one generator per image, so batching never changes which noise an image gets."""
    prompts, seeds = ["a", "bb", "ccc"], [5, 6, 7]
    fake = FakePipe()
    one = generate_images(fake, prompts, seeds, batch_size=1)
    three = generate_images(fake, prompts, seeds, batch_size=3)
    two = generate_images(fake, prompts, seeds, batch_size=2)
    assert fake.calls == [1, 1, 1, 3, 2, 1] and fake.progress == {"disable": True}
    for a, b, c in zip(one, three, two):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    generate_images(fake, prompts[:1], seeds[:1], progress=True)
    assert fake.progress == {"disable": False}


def test_batching_does_not_change_images(pipe):
    """A real (tiny) pipeline: batch 1 vs 3 give the same pixels. Batched CPU kernels (oneDNN convolutions,
    GroupNorm, GEMM vs GEMV) sum in a batch-dependent order, ~1e-6 apart in float, which can flip a rare pixel by
    one level in uint8; the seeding itself is exact (test above)."""
    prompts, seeds = [digit_caption(7), digit_caption(1), digit_caption(7)], [0, 1, 2]
    one = generate_images(pipe, prompts, seeds, num_inference_steps=STEPS, batch_size=1)
    three = generate_images(pipe, prompts, seeds, num_inference_steps=STEPS, batch_size=3)
    assert pipe._progress_bar_config == {"disable": True}
    for a, b in zip(one, three):
        assert a.size == (32, 32) and a.mode == "RGB"
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # Different seeds (same prompt) give different images.
    assert np.abs(np.asarray(one[0], dtype=int) - np.asarray(one[2], dtype=int)).mean() > 5


def test_generate_images_rejects_mismatch():
    with pytest.raises(ValueError, match="same length"):
        generate_images(FakePipe(), ["a", "b"], [1])
    with pytest.raises(ValueError, match="batch_size"):
        generate_images(FakePipe(), ["a"], [1], batch_size=0)


# ----------------------------------------------------------------------------------------------------------
# preference sets


def test_preference_set(pipe, tmp_path):
    out = tmp_path / "sets" / "train.parquet"
    report = build_preference_set(pipe, TieOnPrompt(PROMPTS[1]), PROMPTS, 3, out, num_inference_steps=STEPS)
    table = pq.read_table(out)
    assert table.num_rows == 6 and report["pairs"] == 6
    assert table.schema.names == ["caption", "jpg_0", "jpg_1", "label_0", "score_0", "score_1", "seed_0", "seed_1"]
    assert table.schema.field("jpg_0").type == pa.binary() and table.schema.field("label_0").type == pa.float64()
    rows = table.to_pydict()
    assert rows["caption"] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert rows["seed_0"] == [0, 2, 4] * 2 and rows["seed_1"] == [1, 3, 5] * 2
    assert [pair_seeds(k, 0) for k in range(3)] == [(0, 1), (2, 3), (4, 5)]
    for s0, s1, label in zip(rows["score_0"], rows["score_1"], rows["label_0"]):
        assert label == (1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5)
    assert rows["label_0"][3:] == [0.5] * 3 and report["ties"] == 3
    assert report["per_prompt"][PROMPTS[1]] == {"pairs": 3, "ties": 3, "mean_score": -1.0}
    assert report["per_prompt"][PROMPTS[0]]["pairs"] == 3 and report["seed_range"] == [0, 6]
    assert report["mean_score"] == pytest.approx(np.mean(rows["score_0"] + rows["score_1"]))
    for blob in rows["jpg_0"] + rows["jpg_1"]:
        img = Image.open(io.BytesIO(blob))
        assert img.format == "PNG" and img.size == (32, 32)
    # Image 0 of pair k is the image of (prompt, seed_offset + 2k): the same as sampling it alone.
    alone = generate_images(pipe, [PROMPTS[0]], [2], num_inference_steps=STEPS)[0]
    diff = np.abs(np.asarray(Image.open(io.BytesIO(rows["jpg_0"][1])), dtype=int) - np.asarray(alone, dtype=int))
    assert diff.max() <= 1
    assert [p.name for p in out.parent.iterdir()] == ["train.parquet"]  # no temporary file left

    # The trainer's loader reads it: ties dropped and counted.
    ds, data_report = load_preference_dataset(DataConfig(dataset=str(out), resolution=32))
    assert len(ds) == 3 and data_report["kept"] == 3 and data_report["skipped"] == {"tie": 3}

    # A held-out set from a disjoint seed range.
    held = build_preference_set(pipe, JpegCompressibilityScorer(), PROMPTS[:1], 2, tmp_path / "held.parquet",
                                seed_offset=report["seed_range"][1], num_inference_steps=STEPS)
    held_rows = pq.read_table(tmp_path / "held.parquet").to_pydict()
    assert held_rows["seed_0"] == [6, 8] and held_rows["seed_1"] == [7, 9] and held["seed_range"] == [6, 10]
    train_seeds = set(rows["seed_0"]) | set(rows["seed_1"])
    assert train_seeds.isdisjoint(set(held_rows["seed_0"]) | set(held_rows["seed_1"]))


def test_preference_set_fails_fast(tmp_path):
    class NeedsDigit:
        name = "needs_digit"

        def score(self, images, prompts):
            from lora_dpo.prompts import digit_of

            return np.array([float(digit_of(p)) for p in prompts])

    fake = FakePipe()
    with pytest.raises(ValueError, match="names no digit"):
        build_preference_set(fake, NeedsDigit(), ["a cat"], 2, tmp_path / "x.parquet")
    assert fake.calls == [] and not (tmp_path / "x.parquet").exists()
    for bad in (dict(prompts=[]), dict(pairs_per_prompt=0), dict(seed_offset=-1)):
        kwargs = dict(prompts=PROMPTS, pairs_per_prompt=1, seed_offset=0) | bad
        with pytest.raises(ValueError):
            build_preference_set(fake, JpegCompressibilityScorer(), kwargs["prompts"], kwargs["pairs_per_prompt"],
                                 tmp_path / "x.parquet", seed_offset=kwargs["seed_offset"])


def test_prefs_cli(tiny_sd15, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{digit_caption(0)}\n# skipped\n{digit_caption(5)}\n")
    out = tmp_path / "cli.parquet"
    code = main(["prefs", "--model", str(tiny_sd15), "--scorer", "jpeg", "--prompts", str(prompts),
                 "--pairs-per-prompt", "2", "--seed-offset", "100", "--out", str(out), "--steps", str(STEPS)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(printed)
    assert report["pairs"] == 4 and report["scorer"] == "jpeg_compressibility" and report["seed_range"] == [100, 104]
    rows = pq.read_table(out).to_pydict()
    assert rows["caption"] == [digit_caption(0)] * 2 + [digit_caption(5)] * 2
    assert rows["seed_0"] == [100, 102, 100, 102]


@pytest.mark.parametrize("args, message", [
    (["--scorer", "pickscore"], "unknown scorer 'pickscore'"),
    (["--scorer", "jpeg", "--prompts", "/no/such/prompts.txt"], "/no/such/prompts.txt"),
])
def test_prefs_cli_bad_input(tiny_sd15, tmp_path, capsys, args, message):
    code = main(["prefs", "--model", str(tiny_sd15), "--pairs-per-prompt", "1", "--out", str(tmp_path / "o.parquet"),
                 *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_prefs_cli_not_a_pipeline(tmp_path, capsys):
    code = main(["prefs", "--model", str(tmp_path), "--scorer", "jpeg", "--prompts", "digits",
                 "--pairs-per-prompt", "1", "--out", str(tmp_path / "o.parquet")])
    assert code == 2 and "no model_index.json" in capsys.readouterr().err
