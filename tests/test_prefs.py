"""Seeded batched sampling, preference sets labelled by a scorer (Pick-a-Pic parquet, the `prefs` command), and
real preference sets re-labelled by a scorer (`prefs --relabel`)."""

from __future__ import annotations

import io
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_scorers import save_tiny_clip

from lora_dpo.cli import main
from lora_dpo.config import DataConfig
from lora_dpo.data.images import to_rgb
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.feedback.prefs import build_candidate_set, build_preference_set, pair_seeds
from lora_dpo.feedback.prompts import digit_caption, load_prompts
from lora_dpo.feedback.relabel import relabel_preference_set
from lora_dpo.feedback.scorers import JpegCompressibilityScorer, load_scorer
from lora_dpo.inference.sampling import generate_images

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

    # an SD1.5 pipeline's components, as ``pipe.config`` lists them (the kit reads the family from them)
    config = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}

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
            from lora_dpo.feedback.prompts import digit_of

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


# ----------------------------------------------------------------------------------------------------------
# re-labelling real preference sets (AI feedback on real pairs)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("scorer") / "clip")


class Recording:
    """Wraps a scorer and records how many images each call gets."""

    def __init__(self, scorer) -> None:
        self.scorer, self.name, self.calls = scorer, scorer.name, []

    def score(self, images, prompts):
        self.calls.append(len(images))
        return self.scorer.score(images, prompts)


class Negated:
    name = "negated_jpeg"

    def score(self, images, prompts):
        return -JpegCompressibilityScorer().score(images, prompts)


def _decode(blob: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(blob))
    img.load()
    return to_rgb(img)


def _rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_relabel_messy_pairs(messy_pairs, tiny_clip, tmp_path):
    path, expected = messy_pairs
    clip = load_scorer(str(tiny_clip), device="cpu")
    first = relabel_preference_set(path, clip, tmp_path / "first.parquet")
    diffs = np.array([r["score_0"] - r["score_1"] for r in _rows(tmp_path / "first.parquet")])
    margin = float(np.median(np.abs(diffs)))  # about half of the pairs become ties

    scorer = Recording(clip)
    out = tmp_path / "relabelled.parquet"
    report = relabel_preference_set(path, scorer, out, tie_margin=margin, batch_size=4)
    bad = expected["undecodable_at_load"] + expected["truncated"]
    assert report["rows"] == expected["rows"] == first["rows"]
    assert report["skipped"] == {"undecodable_image": bad} == first["skipped"]
    assert report["relabelled"] == expected["rows"] - bad
    # Streamed: at most batch_size pairs (8 images) per scorer call, every written image scored once.
    assert max(scorer.calls) <= 8 and sum(scorer.calls) == 2 * report["relabelled"]
    assert json.loads((tmp_path / "relabelled.report.json").read_text()) == report
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    inputs = {r["caption"]: r for r in _rows(path)}
    rows = _rows(out)
    assert [r["caption"] for r in rows] == [c for c in inputs if c not in ("garbage 0", "garbage 1", "truncated")]
    for row in rows:
        original = inputs[row["caption"]]
        assert row["jpg_0"] == original["jpg_0"] and row["jpg_1"] == original["jpg_1"]  # bytes kept as they were
        assert row["label_0_original"] == original["label_0"]
        # The scores are the scorer's on these two images, and the label follows them and the margin.
        by_hand = clip.score([_decode(row["jpg_0"]), _decode(row["jpg_1"])], [row["caption"]] * 2)
        np.testing.assert_allclose([row["score_0"], row["score_1"]], by_hand, rtol=0, atol=1e-5)
        s0, s1 = row["score_0"], row["score_1"]
        assert row["label_0"] == (1.0 if s0 > s1 + margin else 0.0 if s1 > s0 + margin else 0.5)
    ties = sum(r["label_0"] == 0.5 for r in rows)
    assert report["ties"] == ties and 0 < ties < len(rows)
    decided = [r for r in rows if r["label_0_original"] in (0.0, 1.0) and r["label_0"] != 0.5]
    agreed = sum(r["label_0"] == r["label_0_original"] for r in decided)
    assert (report["compared"], report["agreed"], report["flipped"]) == (len(decided), agreed, len(decided) - agreed)
    assert report["agreement_rate"] == pytest.approx(agreed / len(decided))

    # The trainer's loader reads it: the scorer's ties are dropped; data.min_score_gap filters on its scores.
    _, loaded = load_preference_dataset(DataConfig(dataset=str(out), resolution=32))
    assert loaded["kept"] == len(rows) - ties and loaded["skipped"] == {"tie": ties}
    gaps = np.abs([r["score_0"] - r["score_1"] for r in rows])
    min_gap = float(np.quantile(gaps, 0.75))
    assert min_gap > margin
    _, gapped = load_preference_dataset(DataConfig(dataset=str(out), resolution=32, min_score_gap=min_gap))
    assert gapped["kept"] == int((gaps >= min_gap).sum()) and gapped["skipped"] == {"small_score_gap": int((gaps < min_gap).sum())}


def test_relabel_agreement_by_hand(photo_pairs, tmp_path):
    """Against a count made straight from the input file, then a second re-labelling keeps the human labels."""
    inputs = _rows(photo_pairs)
    jpeg = JpegCompressibilityScorer()
    labels, originals = [], []
    for row in inputs:
        s0, s1 = jpeg.score([_decode(row["jpg_0"]), _decode(row["jpg_1"])], ["", ""])
        labels.append(1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5)
        originals.append(row["label_0"])
    decided = [(new, old) for new, old in zip(labels, originals) if old in (0.0, 1.0) and new != 0.5]
    agreed = sum(new == old for new, old in decided)
    assert 0 < len(decided) and 0.5 in originals

    out = tmp_path / "jpeg.parquet"
    report = relabel_preference_set(photo_pairs, jpeg, out, batch_size=5)
    assert report["relabelled"] == len(inputs) and report["skipped"] == {}
    assert report["compared"] == len(decided) and report["agreed"] == agreed
    assert report["agreement_rate"] == pytest.approx(agreed / len(decided))
    assert report["original_label_counts"] == {"1.0": originals.count(1.0), "0.0": originals.count(0.0),
                                               "0.5": originals.count(0.5), "other": 0}
    assert report["original_ties_decided"] == sum(o == 0.5 and n != 0.5 for n, o in zip(labels, originals))
    assert [r["label_0"] for r in _rows(out)] == labels
    assert report["original_label_column"] == "label_0"

    # Re-label the re-labelled set: label_0_original (the human labels) is kept and still the reference.
    again = relabel_preference_set(out, Negated(), tmp_path / "negated.parquet")
    rows = _rows(tmp_path / "negated.parquet")
    assert [r["label_0_original"] for r in rows] == originals
    assert [r["label_0"] for r in rows] == [{1.0: 0.0, 0.0: 1.0, 0.5: 0.5}[v] for v in labels]
    assert again["original_label_column"] == "label_0_original"
    assert (again["agreed"], again["flipped"]) == (report["flipped"], report["agreed"])


def _png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="PNG")
    return buf.getvalue()


class RedOverTwo:
    """Score = red value of the top-left pixel / 2: exact numbers, for the tie boundary."""

    name = "red_over_two"

    def score(self, images, prompts):
        return np.array([np.nan if img.getpixel((0, 0))[0] == 77 else img.getpixel((0, 0))[0] / 2 for img in images])


def test_relabel_tie_margin_boundary(tmp_path):
    """|score_0 - score_1| <= tie_margin is a tie; beyond it the higher score wins. Hand-made exact scores."""
    reds = [(100, 100), (101, 100), (102, 100), (99, 100), (98, 100), (100, 103)]
    originals = [1.0, 0.0, 1.0, 1.0, 1.0, 0.5]
    pq.write_table(pa.table({
        "caption": [f"pair {i}" for i in range(len(reds))],
        "jpg_0": [_png_bytes((r0, 0, 0)) for r0, _ in reds], "jpg_1": [_png_bytes((r1, 0, 0)) for _, r1 in reds],
        "label_0": originals,
    }), tmp_path / "pairs.parquet")
    report = relabel_preference_set(tmp_path / "pairs.parquet", RedOverTwo(), tmp_path / "out.parquet", tie_margin=0.5)
    rows = _rows(tmp_path / "out.parquet")
    # score differences 0, 0.5, 1, -0.5, -1, -1.5 with margin 0.5:
    assert [r["label_0"] for r in rows] == [0.5, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert [r["score_0"] - r["score_1"] for r in rows] == [0.0, 0.5, 1.0, -0.5, -1.0, -1.5]
    assert report["ties"] == 3 and report["label_0_counts"] == {"1.0": 1, "0.0": 2, "0.5": 3}
    # Compared: rows 2 (1 vs 1, agrees) and 4 (0 vs 1, flipped); row 5 was a human tie the scorer decides.
    assert (report["compared"], report["agreed"], report["flipped"]) == (2, 1, 1)
    assert report["agreement_rate"] == 0.5 and report["original_ties_decided"] == 1
    assert report["mean_abs_margin"] == pytest.approx((0 + 0.5 + 1 + 0.5 + 1 + 1.5) / 6)


def test_relabel_skips_nonfinite_scores(tmp_path):
    """A pair with a NaN score is skipped and counted; the rows after it keep their own images and scores."""
    reds = [(10, 20), (77, 20), (30, 20), (40, 77), (50, 60)]
    blobs = [(_png_bytes((r0, 1, 1)), _png_bytes((r1, 2, 2))) for r0, r1 in reds]
    pq.write_table(pa.table({"caption": [f"p{i}" for i in range(5)], "jpg_0": [b[0] for b in blobs],
                             "jpg_1": [b[1] for b in blobs], "label_0": [0.0] * 5}), tmp_path / "pairs.parquet")
    report = relabel_preference_set(tmp_path / "pairs.parquet", RedOverTwo(), tmp_path / "out.parquet", batch_size=8)
    assert report["skipped"] == {"nonfinite_score": 2} and report["relabelled"] == 3
    rows = _rows(tmp_path / "out.parquet")
    assert [r["caption"] for r in rows] == ["p0", "p2", "p4"]
    assert [(r["jpg_0"], r["jpg_1"]) for r in rows] == [blobs[0], blobs[2], blobs[4]]
    assert [(r["score_0"], r["score_1"], r["label_0"]) for r in rows] == [(5.0, 10.0, 0.0), (15.0, 10.0, 1.0),
                                                                          (25.0, 30.0, 0.0)]


def test_relabel_paths_and_image_features(tmp_path):
    """Images given as relative paths (one missing) or as datasets Image features ({"bytes", "path"} dicts); extra
    columns kept; the output holds each image's original bytes."""
    import datasets

    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    blobs = [_png_bytes((40 * i, 10, 200 - 40 * i)) for i in range(5)]
    for i, blob in enumerate(blobs):
        (folder / "img" / f"{i}.png").write_bytes(blob)
    pq.write_table(pa.table({
        "caption": ["a", "b", "c", None],
        "jpg_0": ["img/0.png", "img/1.png", "img/4.png", "img/0.png"],
        "jpg_1": ["img/2.png", "img/missing.png", "img/3.png", "img/1.png"],
        "label_0": [1.0, 0.0, 0.5, 1.0],
        "user_id": [7, 8, 9, 10],
    }), folder / "pairs.parquet")
    report = relabel_preference_set(folder / "pairs.parquet", JpegCompressibilityScorer(), tmp_path / "out.parquet")
    assert report["skipped"] == {"missing_image_file": 1, "missing_caption": 1} and report["relabelled"] == 2
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("jpg_0").type == pa.binary()
    rows = table.to_pylist()
    assert [(r["caption"], r["user_id"]) for r in rows] == [("a", 7), ("c", 9)]
    assert (rows[0]["jpg_0"], rows[0]["jpg_1"], rows[1]["jpg_0"]) == (blobs[0], blobs[2], blobs[4])

    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64")})
    saved = datasets.Dataset.from_dict({
        "caption": ["x", "y"], "jpg_0": [{"bytes": blobs[0], "path": None}, {"bytes": blobs[1], "path": None}],
        "jpg_1": [{"bytes": blobs[2], "path": None}, {"bytes": b"junk", "path": None}], "label_0": [0.0, 1.0],
    }, features=features)
    saved.save_to_disk(str(tmp_path / "saved"))
    report = relabel_preference_set(tmp_path / "saved", JpegCompressibilityScorer(), tmp_path / "saved.parquet")
    assert report["skipped"] == {"undecodable_image": 1} and report["relabelled"] == 1
    row = _rows(tmp_path / "saved.parquet")[0]
    assert (row["caption"], row["jpg_0"], row["jpg_1"], row["label_0_original"]) == ("x", blobs[0], blobs[2], 0.0)
    _, loaded = load_preference_dataset(DataConfig(dataset=str(tmp_path / "saved.parquet"), resolution=8))
    assert loaded["kept"] + loaded["skipped"].get("tie", 0) == 1


def test_relabel_pair_folder_and_csv(tmp_path):
    """The data module's other layouts, read as streams: a w/ + l/ pair folder (preferred first) and a CSV of
    preferred / rejected paths (untyped columns)."""
    folder = tmp_path / "pairs"
    for side in ("w", "l"):
        (folder / side).mkdir(parents=True)
    blobs = {}
    for i in range(3):
        for side, color in (("w", (200, 30 * i, 0)), ("l", (0, 30 * i, 200))):
            blobs[side, i] = _png_bytes(color)
            (folder / side / f"{i}.png").write_bytes(blobs[side, i])
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "caption": f"pair {i}"}) + "\n"
                                                   for i in range(3)))
    report = relabel_preference_set(folder, RedOverTwo(), tmp_path / "folder.parquet", batch_size=2)
    rows = _rows(tmp_path / "folder.parquet")
    assert report["relabelled"] == 3 and report["skipped"] == {} and report["agreement_rate"] == 1.0
    assert [r["label_0_original"] for r in rows] == [1.0] * 3 and [r["label_0"] for r in rows] == [1.0] * 3
    assert [(r["jpg_0"], r["jpg_1"]) for r in rows] == [(blobs["w", i], blobs["l", i]) for i in range(3)]
    with pytest.raises(ValueError, match="inside"):
        relabel_preference_set(folder, RedOverTwo(), folder / "relabelled.parquet")

    (tmp_path / "pairs.csv").write_text("caption,preferred,rejected\nfirst,pairs/l/0.png,pairs/w/0.png\n"
                                        "second,pairs/w/1.png,pairs/w/missing.png\nthird,pairs/w/2.png,pairs/l/2.png\n")
    report = relabel_preference_set(tmp_path / "pairs.csv", RedOverTwo(), tmp_path / "csv.parquet", batch_size=2)
    assert report["skipped"] == {"missing_image_file": 1} and report["relabelled"] == 2
    assert (report["compared"], report["flipped"]) == (2, 1)  # the first row's "preferred" image is less red
    rows = _rows(tmp_path / "csv.parquet")
    assert [(r["caption"], r["label_0"], r["jpg_0"]) for r in rows] == [("first", 0.0, blobs["l", 0]),
                                                                      ("third", 1.0, blobs["w", 2])]


def test_relabel_errors(messy_pairs, tmp_path):
    path, _ = messy_pairs
    jpeg = JpegCompressibilityScorer()
    with pytest.raises(ValueError, match="tie_margin"):
        relabel_preference_set(path, jpeg, tmp_path / "o.parquet", tie_margin=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        relabel_preference_set(path, jpeg, tmp_path / "o.parquet", batch_size=0)
    copy = tmp_path / "copy.parquet"
    shutil.copy(path, copy)
    with pytest.raises(ValueError, match=r"is \(inside\) the input"):
        relabel_preference_set(copy, jpeg, copy)
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"junk"], "jpg_1": [b"junk"], "label_0": [1.0]}),
                   tmp_path / "junk.parquet")
    with pytest.raises(ValueError, match="no row .* could be scored"):
        relabel_preference_set(tmp_path / "junk.parquet", jpeg, tmp_path / "o.parquet")
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_one": [b"x"], "label_0": [1.0]}),
                   tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match="lacks column 'jpg_1'"):
        relabel_preference_set(tmp_path / "cols.parquet", jpeg, tmp_path / "o.parquet")
    with pytest.raises(FileNotFoundError):
        relabel_preference_set(tmp_path / "missing.parquet", jpeg, tmp_path / "o.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cols.parquet", "copy.parquet", "junk.parquet"]


def test_relabel_cli(messy_pairs, tiny_clip, tmp_path, capsys):
    path, expected = messy_pairs
    out = tmp_path / "ai.parquet"
    code = main(["prefs", "--relabel", str(path), "--scorer", str(tiny_clip), "--out", str(out),
                 "--tie-margin", "0.01", "--batch-size", "8", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(printed)
    assert report == json.loads((tmp_path / "ai.report.json").read_text())
    assert report["scorer"] == "clip_score" and report["tie_margin"] == 0.01
    assert report["relabelled"] == pq.read_table(out).num_rows == expected["rows"] - sum(report["skipped"].values())
    assert report["skipped"] == {"undecodable_image": expected["undecodable_at_load"] + expected["truncated"]}
    assert math.isclose(report["agreement_rate"], report["agreed"] / report["compared"])


@pytest.mark.parametrize("args, message", [
    (["--scorer", "BAD_CLIP"], "describes a 'bert' model"),
    (["--scorer", "/no/such/scorer"], "scorer '/no/such/scorer' not found"),
    (["--scorer", "jpeg", "--pairs-per-prompt", "2"], "--pairs-per-prompt / --candidates apply to sampling"),
    (["--scorer", "jpeg", "--candidates", "4"], "--pairs-per-prompt / --candidates apply to sampling"),
])
def test_relabel_cli_bad_input(messy_pairs, tmp_path, capsys, args, message):
    bad = tmp_path / "bad_clip"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    args = [str(bad) if a == "BAD_CLIP" else a for a in args]
    code = main(["prefs", "--relabel", str(messy_pairs[0]), "--out", str(tmp_path / "o.parquet"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_prefs_cli_needs_one_source(tiny_sd15, messy_pairs, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # --model and --relabel exclude each other (argparse: exit 2)
        main(["prefs", "--model", str(tiny_sd15), "--relabel", str(messy_pairs[0]), "--scorer", "jpeg",
              "--out", str(tmp_path / "o.parquet")])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    code = main(["prefs", "--model", str(tiny_sd15), "--scorer", "jpeg", "--out", str(tmp_path / "o.parquet")])
    assert code == 2 and "takes one of --pairs-per-prompt P" in capsys.readouterr().err
    code = main(["prefs", "--model", str(tiny_sd15), "--scorer", "jpeg", "--out", str(tmp_path / "o.parquet"),
                 "--pairs-per-prompt", "2", "--candidates", "4"])
    assert code == 2 and "takes one of --pairs-per-prompt P" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# candidates and pairing (issue 18)


@pytest.mark.parametrize("pairing, k, per_prompt", [("best-worst", 1, 1), ("top-bottom-k", 2, 2), ("adjacent", 1, 3)])
def test_candidate_set_pairs_the_scored_candidates(pipe, tmp_path, pairing, k, per_prompt):
    """N = 6 candidates per prompt from seeds S .. S+5, scored; the rows are the rule's pairs, preferred first, and
    each row's images and scores are those of its seeds (re-sampled and re-scored here)."""
    out = tmp_path / "cand.parquet"
    scorer = JpegCompressibilityScorer()
    report = build_candidate_set(pipe, scorer, PROMPTS, 6, out, pairing=pairing, k=k, seed_offset=50,
                                 num_inference_steps=STEPS)
    table = pq.read_table(out).to_pylist()
    assert report["pairs"] == len(table) == len(PROMPTS) * per_prompt - sum(report["skipped"].values())
    assert report["seed_range"] == [50, 56] and all(r["label_0"] == 1.0 and r["candidates"] == 6 for r in table)
    for prompt in PROMPTS:
        images = generate_images(pipe, [prompt] * 6, list(range(50, 56)), num_inference_steps=STEPS)
        scores = np.asarray(scorer.score(images, [prompt] * 6))
        rows = [r for r in table if r["caption"] == prompt]
        for r in rows:
            assert r["score_0"] == scores[r["seed_0"] - 50] and r["score_1"] == scores[r["seed_1"] - 50]
            assert r["score_0"] > r["score_1"]
            assert np.array_equal(np.asarray(_decode(r["jpg_0"])), np.asarray(images[r["seed_0"] - 50]))
        if pairing == "best-worst":
            assert [(r["seed_0"], r["seed_1"]) for r in rows] == [(50 + scores.argmax(), 50 + scores.argmin())]
    # the set trains as it is: the loader reads every row, preferred first
    dataset, data_report = load_preference_dataset(DataConfig(dataset=str(out), resolution=32))
    assert len(dataset) == len(table)


def test_candidate_set_counts_degenerate_prompts(tmp_path):
    """A scorer that gives all of a prompt's candidates one score: that prompt gives no pair, counted."""
    out = tmp_path / "cand.parquet"
    report = build_candidate_set(FakePipe(), TieOnPrompt(PROMPTS[1]), PROMPTS, 4, out)
    assert report["skipped"] == {"degenerate_group": 1} and report["pairs"] == 1
    assert pq.read_table(out).column("caption").to_pylist() == [PROMPTS[0]]


def test_candidate_groups_take_their_own_seeds(pipe, tmp_path):
    """Two groups of N = 3 per prompt: group j of every prompt samples the seeds S + 3j .. S + 3j + 2, and each
    best-worst pair takes both its images from one group (re-sampled here)."""
    out = tmp_path / "groups.parquet"
    scorer = JpegCompressibilityScorer()
    report = build_candidate_set(pipe, scorer, PROMPTS, 3, out, seed_offset=7, groups_per_prompt=2,
                                 num_inference_steps=STEPS)
    table = pq.read_table(out).to_pylist()
    assert report["seed_range"] == [7, 13] and report["groups_per_prompt"] == 2
    assert len(table) == 2 * len(PROMPTS) - sum(report["skipped"].values())
    for prompt in PROMPTS:
        images = generate_images(pipe, [prompt] * 6, list(range(7, 13)), num_inference_steps=STEPS)
        scores = np.asarray(scorer.score(images, [prompt] * 6)).reshape(2, 3)
        expected = [(7 + 3 * j + int(s.argmax()), 7 + 3 * j + int(s.argmin())) for j, s in enumerate(scores)]
        assert [(r["seed_0"], r["seed_1"]) for r in table if r["caption"] == prompt] == expected
    with pytest.raises(ValueError, match="groups_per_prompt must be >= 1"):
        build_candidate_set(FakePipe(), scorer, PROMPTS, 3, out, groups_per_prompt=0)


def test_prefs_cli_candidates(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "cand.parquet"
    code = main(["prefs", "--model", str(tiny_sd15), "--scorer", "jpeg", "--prompts", "digits", "--candidates", "4",
                 "--pairing", "best-worst", "--out", str(out), "--steps", str(STEPS)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["pairs"] == 10 - sum(report["skipped"].values()) and report["candidates"] == 4
    code = main(["prefs", "--model", str(tiny_sd15), "--scorer", "jpeg", "--candidates", "4", "--pairing",
                 "top-bottom-k", "--top-k", "3", "--out", str(tmp_path / "bad.parquet")])
    assert code == 2 and "k <= candidates / 2 = 2" in capsys.readouterr().err
    assert not (tmp_path / "bad.parquet").exists()


@pytest.mark.parametrize("name, write, column", [
    ("parti.tsv", lambda p: p.write_text("Prompt\tCategory\nA red fox\tAnimals\n\nA tall tower\tArch\n"), None),
    ("prompts.csv", lambda p: p.write_text('id,text\n1,"a cat, sitting"\n2,a dog\n'), None),
    ("prompts.jsonl", lambda p: p.write_text('{"caption": "a cat"}\n{"caption": "a dog"}\n'), None),
    ("prompts.parquet", lambda p: pq.write_table(pa.table({"q": ["a cat", "a dog"]}), p), "q"),
])
def test_prompts_from_a_table_column(tmp_path, name, write, column):
    path = tmp_path / name
    write(path)
    prompts = load_prompts(str(path), column)
    assert len(prompts) == 2 and all(p and p == p.strip() for p in prompts)
    if name == "prompts.csv":
        assert prompts == ["a cat, sitting", "a dog"]  # quoted commas stay in the prompt


def test_prompt_table_without_the_column_is_refused(tiny_sd15, tmp_path, capsys):
    path = tmp_path / "p.csv"
    path.write_text("id,words\n1,a cat\n")
    code = main(["prefs", "--model", str(tiny_sd15), "--scorer", "jpeg", "--prompts", str(path), "--candidates", "2",
                 "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and "has no a column named prompt / Prompt / caption / text" in err and "id, words" in err
    code = main(["prefs", "--model", str(tiny_sd15), "--scorer", "jpeg", "--prompts", str(path), "--prompt-column",
                 "words", "--candidates", "2", "--out", str(tmp_path / "o.parquet"), "--steps", "1"])
    assert code == 0 and json.loads(capsys.readouterr().out)["prompts"] == 1


def test_prefs_cli_votes_and_samples_from_an_adapter(tiny_sd15, lora_sd15, tmp_path, capsys):
    """Two copies of one scorer vote as that scorer does (mean rank keeps its order); --adapter samples from the
    model plus the LoRA: other images from the same seeds."""
    common = ["prefs", "--model", str(tiny_sd15), "--prompts", "digits", "--candidates", "4", "--steps", str(STEPS)]
    assert main([*common, "--scorer", "jpeg", "--out", str(tmp_path / "one.parquet")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main([*common, "--scorer", "jpeg", "--scorer", "jpeg", "--out", str(tmp_path / "two.parquet")]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["vote"] == "mean-rank" and two["scorer"] == "jpeg_compressibility+jpeg_compressibility"
    seeds = [pq.read_table(tmp_path / f).select(["seed_0", "seed_1"]).to_pylist() for f in ("one.parquet", "two.parquet")]
    assert seeds[0] == seeds[1] and one["pairs"] == two["pairs"]
    assert main([*common, "--scorer", "jpeg", "--adapter", str(lora_sd15), "--out", str(tmp_path / "lora.parquet")]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["adapter"] == str(lora_sd15) and tuned["mean_score"] != one["mean_score"]
    base_rows, lora_rows = (pq.read_table(tmp_path / f).to_pylist() for f in ("one.parquet", "lora.parquet"))
    same_seed = [(b, t) for b in base_rows for t in lora_rows if (b["caption"], b["seed_0"]) == (t["caption"], t["seed_0"])]
    assert same_seed and all(b["jpg_0"] != t["jpg_0"] for b, t in same_seed)
    assert main([*common[:5], "--scorer", "jpeg", "--scorer", "jpeg", "--pairs-per-prompt", "1",
                 "--out", str(tmp_path / "x.parquet")]) == 2
    assert "sample with --model and --candidates N" in capsys.readouterr().err
