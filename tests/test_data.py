"""Tests for the data flow (lora_dpo.data.sources / filters / images / pairs / data / streaming): loading/filtering,
pair processing, collation, sampling. All data is built here."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lora_dpo.config import DataConfig
from lora_dpo.data.filters import SkipCounter
from lora_dpo.data.loader import PairSampler, build_dataloader
from lora_dpo.data.pairs import PairBatch, PairDataset, SkippedRow, collate_pairs
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamedPairs, merge_reports

RED, BLUE = (220, 30, 30), (30, 30, 220)
SCHEMA = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64())])


def img_bytes(img: Image.Image | tuple, size: tuple[int, int] = (24, 24), fmt: str = "PNG") -> bytes:
    """Encode a PIL image (or a solid RGB colour of ``size`` = (w, h)) as PNG/JPEG bytes."""
    if isinstance(img, tuple):
        img = Image.new("RGB", size, img)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_parquet(path, rows: list[tuple]) -> str:
    """rows: (caption, jpg_0 bytes, jpg_1 bytes, label_0)."""
    cols = list(zip(*rows))
    pq.write_table(pa.table([list(c) for c in cols], schema=SCHEMA), path)
    return str(path)


def make_cfg(tmp_path, dataset, **kw) -> DataConfig:
    base = {"resolution": 16, "random_flip": False, "cache_dir": str(tmp_path / "hf_cache")}
    return DataConfig(dataset=str(dataset), **{**base, **kw})


@pytest.fixture(autouse=True)
def _no_stream_sleep(monkeypatch):
    """datasets sleeps 5 s when some parquet streams end or are closed (its workaround for arrow issue 45214),
    also when a test's stream is garbage-collected during a later test."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def is_red(pixels: torch.Tensor) -> bool:
    """(3, R, R) in [-1, 1]: red channel clearly above blue."""
    return bool(pixels[0].mean() > 0.5 and pixels[2].mean() < -0.5)


def load(tmp_path, rows, **kw):
    cfg = make_cfg(tmp_path, write_parquet(tmp_path / "pairs.parquet", rows), **kw)
    ds, report = load_preference_dataset(cfg)
    return ds, report, cfg


# ----------------------------------------------------------------------------------------------------------
# Load-time filtering and orientation


def test_filtering_counts_and_orientation(tmp_path, caplog):
    red, blue = img_bytes(RED), img_bytes(BLUE, fmt="JPEG")
    rows = [
        ("w first", red, blue, 1.0),
        ("tie", red, blue, 0.5),
        ("w second", blue, red, 0.0),
        ("bad", red, blue, 0.3),
        (None, red, blue, 1.0),
        ("no image", red, None, 1.0),
        ("garbage", b"this is not an image at all", blue, 0.0),
        ("tie2", red, red, 0.5),
    ]
    with caplog.at_level(logging.INFO, logger="lora_dpo.data.sources"):
        ds, report, cfg = load(tmp_path, rows)
    assert report["rows"] == 8 and report["kept"] == 2 and report["scanned"] == 8
    assert report["skipped"] == {
        "tie": 2, "bad_label": 1, "missing_caption": 1, "missing_image": 1, "undecodable_image": 1
    }
    json.dumps(report)
    assert any("2 kept" in r.getMessage() for r in caplog.records)
    assert ds["caption"] == ["w first", "w second"]
    pairs = PairDataset(ds, cfg, seed=0)
    for i in range(2):
        ex = pairs[i]
        assert ex["index"] == i and ex["pixel_values"].shape == (2, 3, 16, 16)
        assert is_red(ex["pixel_values"][0]) and not is_red(ex["pixel_values"][1])


def test_max_pairs_keeps_first_kept_rows(tmp_path):
    rows = [(f"c{i}", img_bytes(RED), img_bytes(BLUE), 0.5 if i % 2 else 1.0) for i in range(10)]
    ds, report, _ = load(tmp_path, rows, max_pairs=3)
    assert ds["caption"] == ["c0", "c2", "c4"]
    assert report["kept"] == 3 and report["scanned"] == 5 and report["skipped"] == {"tie": 2}


def test_drop_ties_false_is_rejected(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [("a", img_bytes(RED), img_bytes(BLUE), 1.0)])
    with pytest.raises(ValueError, match="data.drop_ties"):
        load_preference_dataset(make_cfg(tmp_path, path, drop_ties=False))


def test_truncated_jpeg_passes_header_but_is_skipped_in_batch(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = img_bytes(Image.fromarray(noise), fmt="JPEG")
    truncated = full[: len(full) // 2]
    assert Image.open(io.BytesIO(truncated)).size == (64, 64)  # the header alone is fine
    rows = [("ok", img_bytes(RED), img_bytes(BLUE), 1.0), ("cut", img_bytes(RED), truncated, 1.0)]
    ds, report, cfg = load(tmp_path, rows)
    assert report["kept"] == 2 and report["skipped"] == {}
    pairs = PairDataset(ds, cfg, seed=0)
    assert pairs[1] == SkippedRow("undecodable_image", 1)
    batch = collate_pairs([pairs[0], pairs[1]])
    assert batch.num_pairs == 1 and batch.num_skipped == 1 and batch.skipped == {"undecodable_image": 1}
    assert batch.indices == [0] and batch.pixel_values.shape == (2, 3, 16, 16)
    empty = collate_pairs([pairs[1]])
    assert empty.num_pairs == 0 and empty.num_skipped == 1 and empty.pixel_values.shape[0] == 0


# ----------------------------------------------------------------------------------------------------------
# Image modes and sizes


def test_mode_conversions_and_odd_sizes(tmp_path):
    gray = Image.new("L", (16, 16), 200)
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black -> white
    palette = Image.new("RGB", (16, 16), RED).convert("P", palette=Image.Palette.ADAPTIVE)
    odd = Image.new("RGB", (37, 53), BLUE)
    deep = Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16))  # 16-bit grayscale
    assert deep.mode == "I;16"
    rows = [
        ("gray", img_bytes(gray), img_bytes(odd), 1.0),
        ("rgba", img_bytes(clear), img_bytes(palette), 1.0),
        ("deep", img_bytes(deep), img_bytes(RED, size=(8, 12), fmt="JPEG"), 1.0),
    ]
    ds, report, cfg = load(tmp_path, rows)
    assert report["converted"] == {"grayscale": 2, "rgba": 1, "palette": 1, "odd_size": 2, "upscaled": 1}
    pairs = PairDataset(ds, cfg, seed=0)
    examples = [pairs[i] for i in range(3)]
    for ex in examples:
        px = ex["pixel_values"]
        assert px.shape == (2, 3, 16, 16) and px.dtype == torch.float32
        assert px.min() >= -1.0 and px.max() <= 1.0
    g = examples[0]["pixel_values"][0]
    assert torch.allclose(g, torch.full_like(g, 200 / 127.5 - 1))  # gray 200 on all three channels
    assert torch.equal(examples[1]["pixel_values"][0], torch.ones(3, 16, 16))  # transparent -> white
    assert is_red(examples[1]["pixel_values"][1])  # palette keeps its colour
    assert torch.allclose(examples[2]["pixel_values"][0], torch.full((3, 16, 16), round(40000 / 257) / 127.5 - 1))
    assert examples[0]["original_size"].tolist() == [[16, 16], [53, 37]]
    assert examples[2]["original_size"].tolist() == [[16, 16], [12, 8]]
    # 37x53 -> short side 16: 16x23, center crop top = (23 - 16) // 2 = 3
    assert examples[0]["crop_top_left"].tolist() == [[0, 0], [3, 0]]


def test_rgba_partial_alpha_composited_over_white(tmp_path):
    half = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    ds, _, cfg = load(tmp_path, [("a", img_bytes(half), img_bytes(BLUE), 1.0)])
    px = PairDataset(ds, cfg, seed=0)[0]["pixel_values"][0]
    expect = torch.tensor([255, 127, 127]) / 127.5 - 1  # 255*(1-128/255) ~ 127
    assert torch.allclose(px.mean(dim=(1, 2)), expect, atol=0.02)


# ----------------------------------------------------------------------------------------------------------
# One crop / flip / caption decision per pair


def coord_image(h: int, w: int) -> Image.Image:
    """Pixel (y, x) = (4y, 4x, 7): the crop position can be read back from the top-left output pixel."""
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([yy * 4, xx * 4, np.full_like(yy, 7)], -1).astype(np.uint8))


def to_uint8(px: torch.Tensor) -> np.ndarray:
    return ((px + 1) * 127.5).round().to(torch.uint8).numpy()


def test_identical_images_get_identical_crop_and_flip(tmp_path):
    rng = np.random.default_rng(1)
    wide, tall = (img_bytes(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))) for shape in
                  [(24, 40, 3), (40, 24, 3)])  # landscape (random left) and portrait (random top)
    ds, _, _ = load(tmp_path, [(f"c{i}", im, im, float(i % 2)) for i in range(6) for im in (wide, tall)])
    cfg = make_cfg(tmp_path, "unused", random_crop=True, random_flip=True)
    flips, crops = set(), set()
    for seed in range(3):
        pairs = PairDataset(ds, cfg, seed=seed)
        for i in range(len(pairs)):
            ex = pairs[i]
            assert torch.equal(ex["pixel_values"][0], ex["pixel_values"][1])
            assert torch.equal(ex["crop_top_left"][0], ex["crop_top_left"][1])
            crops.add((i % 2, *ex["crop_top_left"][0].tolist()))
            flipped = PairDataset(ds, cfg.model_copy(update={"random_flip": False}), seed=seed)[i]
            flips.add(not torch.equal(flipped["pixel_values"], ex["pixel_values"]))
    assert flips == {True, False} and len({c for c in crops if c[0]}) > 3 and len({c for c in crops if not c[0]}) > 3


def test_crop_positions_are_per_image_and_share_fractions(tmp_path):
    # No resize needed (short side 16 == R): img_w 32x16 (h x w), img_l 16x48; coordinates readable from pixels.
    a, b = img_bytes(coord_image(32, 16)), img_bytes(coord_image(16, 48))
    ds, _, cfg = load(tmp_path, [("c", a, b, 1.0), ("c", b, a, 0.0)] * 10)
    center = PairDataset(ds, cfg, seed=0)[0]
    assert center["original_size"].tolist() == [[32, 16], [16, 48]]
    assert center["crop_top_left"].tolist() == [[8, 0], [0, 16]]
    rand_cfg = cfg.model_copy(update={"random_crop": True})
    tops, lefts = [], []
    for i in range(20):
        ex = PairDataset(ds, rand_cfg, seed=3)[i]
        (tw, lw), (tl, ll) = ex["crop_top_left"].tolist()
        assert lw == 0 and tl == 0 and 0 <= tw <= 16 and 0 <= ll <= 32
        for k in range(2):  # the top-left output pixel encodes the crop origin
            r, g, _ = to_uint8(ex["pixel_values"][k])[:, 0, 0]
            assert (r // 4, g // 4) == tuple(ex["crop_top_left"][k].tolist())
        tops.append(tw)
        lefts.append(ll)
    assert len(set(tops)) > 3 and len(set(lefts)) > 3


@pytest.mark.parametrize("axis", [0, 1])
def test_crop_fractions_shared_across_sizes(tmp_path, axis):
    # Landscape (axis 1): img_w 32x64 (h x w) -> 16x32 (left range 16), img_l 16x48 (left range 32), so one
    # shared fraction gives left_l ~ 2 * left_w. Portrait (axis 0): the same, transposed, for top.
    shapes = [(32, 64), (16, 48)] if axis else [(64, 32), (48, 16)]
    a, b = (img_bytes(coord_image(*hw)) for hw in shapes)
    ds, _, cfg = load(tmp_path, [("c", a, b, 1.0)] * 30, random_crop=True)
    pairs = PairDataset(ds, cfg, seed=5)
    offsets = []
    for i in range(30):
        ex = pairs[i]
        assert ex["original_size"].tolist() == [list(hw) for hw in shapes]
        crop = ex["crop_top_left"]
        assert crop[:, 1 - axis].tolist() == [0, 0]
        w, lo = crop[:, axis].tolist()
        assert abs(lo - 2 * w) <= 1
        offsets.append(w)
    assert len(set(offsets)) > 5


def test_caption_dropout_rate_and_off(tmp_path):
    tiny = img_bytes(RED, size=(16, 16))
    ds, _, cfg = load(tmp_path, [(f"caption {i}", tiny, tiny, 1.0) for i in range(400)])
    half = PairDataset(ds, cfg.model_copy(update={"caption_dropout": 0.5}), seed=0)
    dropped = sum(half[i]["caption"] == "" for i in range(400))
    assert 150 <= dropped <= 250  # Binomial(400, 0.5): sd = 10
    never = PairDataset(ds, cfg, seed=0)
    assert all(never[i]["caption"] == f"caption {i}" for i in range(400))


# ----------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_epoch_index_is_identical_other_epoch_differs(tmp_path):
    noise = [img_bytes(Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 28, 3), dtype=np.uint8)))
             for i in range(2)]
    ds, _, _ = load(tmp_path, [("c", noise[0], noise[1], 1.0)] * 16)
    cfg = make_cfg(tmp_path, "unused", random_crop=True, random_flip=True, caption_dropout=0.3)
    a, b = PairDataset(ds, cfg, seed=7), PairDataset(ds, cfg, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    for i in (0, 5, 15):
        ea, eb = a[i], b[i]
        assert torch.equal(ea["pixel_values"], eb["pixel_values"]) and ea["caption"] == eb["caption"]
        assert torch.equal(ea["crop_top_left"], eb["crop_top_left"])
    b.set_epoch(3)
    assert any(not torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) for i in range(16))
    c = PairDataset(ds, cfg, seed=8)
    c.set_epoch(2)
    assert any(not torch.equal(a[i]["pixel_values"], c[i]["pixel_values"]) for i in range(16))


# ----------------------------------------------------------------------------------------------------------
# Collation and sampling


def test_collate_puts_all_preferred_first(tmp_path):
    colours = [((250, 0, 0), (0, 0, 250)), ((0, 250, 0), (250, 250, 0)), ((0, 250, 250), (250, 0, 250))]
    rows = [("p0", img_bytes(colours[0][0]), img_bytes(colours[0][1]), 1.0),
            ("p1", img_bytes(colours[1][1]), img_bytes(colours[1][0], size=(16, 32)), 0.0),  # flipped row
            ("p2", img_bytes(colours[2][0], size=(40, 16)), img_bytes(colours[2][1]), 1.0)]
    ds, _, cfg = load(tmp_path, rows)
    pairs = PairDataset(ds, cfg, seed=0)
    batch = collate_pairs([pairs[0], pairs[1], pairs[2]])
    assert isinstance(batch, PairBatch) and batch.num_pairs == 3 and batch.num_skipped == 0
    assert batch.pixel_values.shape == (6, 3, 16, 16)
    means = to_uint8(batch.pixel_values).reshape(6, 3, -1).mean(-1).round()
    expected = [c[0] for c in colours] + [c[1] for c in colours]
    assert np.abs(means - np.array(expected)).max() <= 2
    assert batch.captions == ["p0", "p1", "p2"] and batch.indices == [0, 1, 2]
    assert batch.original_size.tolist() == [[24, 24], [32, 16], [16, 40], [24, 24], [24, 24], [24, 24]]
    assert batch.target_size.tolist() == [[16, 16]] * 6 and batch.target_size.dtype == torch.long
    moved = batch.to("cpu")
    assert moved.num_pairs == 3 and torch.equal(moved.crop_top_left, batch.crop_top_left)


def test_pair_sampler_shards_resume_and_epochs():
    full = [list(PairSampler(10, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert len(full[0]) == len(full[1]) == 5
    assert set(full[0]).isdisjoint(full[1]) and sorted(full[0] + full[1]) == list(range(10))
    odd = [PairSampler(11, seed=3, num_replicas=2, rank=r) for r in range(2)]
    shards = [list(s) for s in odd]
    assert [len(s) for s in odd] == [6, 6] and set(shards[0] + shards[1]) == set(range(11))
    assert len(shards[0] + shards[1]) == 12  # one index repeated by wrap-around padding
    s = PairSampler(10, seed=3, num_replicas=2, rank=1)
    s.start_at(3)
    assert len(s) == 2 and list(s) == full[1][3:]
    assert list(s) == full[1]  # start_at applies once
    e1 = PairSampler(10, seed=3)
    e1.set_epoch(1)
    e0 = list(PairSampler(10, seed=3))
    assert sorted(e0) == sorted(e1) == list(range(10)) and list(e1) != e0
    assert list(PairSampler(5, seed=3, shuffle=False)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="rank"):
        PairSampler(10, seed=0, num_replicas=2, rank=2)


def test_build_dataloader_resume_and_workers(tmp_path):
    rows = [(f"c{i}", img_bytes(RED), img_bytes(BLUE), 1.0) for i in range(13)]
    ds, _, cfg = load(tmp_path, rows, random_flip=True, random_crop=True)
    full = list(build_dataloader(ds, cfg, batch_size=3, seed=1, epoch=2))
    assert len(full) == 4 and all(b.num_pairs == 3 for b in full)  # drop_last: 13 -> 4 batches of 3
    resumed = list(build_dataloader(ds, cfg, batch_size=3, seed=1, epoch=2, start_batch=2))
    assert [b.indices for b in resumed] == [b.indices for b in full[2:]]
    assert all(torch.equal(x.pixel_values, y.pixel_values) for x, y in zip(resumed, full[2:]))
    other_epoch = list(build_dataloader(ds, cfg, batch_size=3, seed=1, epoch=3))
    assert [b.indices for b in other_epoch] != [b.indices for b in full]
    workers = list(build_dataloader(ds, cfg.model_copy(update={"num_workers": 2}), batch_size=3, seed=1, epoch=2))
    assert all(torch.equal(x.pixel_values, y.pixel_values) for x, y in zip(workers, full))
    ranks = [list(build_dataloader(ds, cfg, batch_size=2, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    seen = [i for r in ranks for b in r for i in b.indices]
    assert len(seen) == 12 and len(set(seen)) >= 11
    with pytest.raises(ValueError, match="train.batch_size"):
        build_dataloader(ds, cfg, batch_size=20, seed=1)


# ----------------------------------------------------------------------------------------------------------
# Errors and sources


def test_missing_column_names_column_and_config_key(tmp_path):
    table = pa.table({"prompt": ["a"], "jpg_0": [img_bytes(RED)], "jpg_1": [img_bytes(BLUE)], "label_0": [1.0]})
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="data.caption_column") as err:
        load_preference_dataset(make_cfg(tmp_path, tmp_path / "p.parquet"))
    assert "'caption'" in str(err.value) and "prompt" in str(err.value)
    ds, _ = load_preference_dataset(make_cfg(tmp_path, tmp_path / "p.parquet", caption_column="prompt"))
    assert len(ds) == 1
    with pytest.raises(ValueError, match="data.image_columns") as err:
        load_preference_dataset(make_cfg(tmp_path, tmp_path / "p.parquet", caption_column="prompt",
                                         image_columns=("jpg_0", "image_b")))
    assert "'image_b'" in str(err.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*data.dataset"):
        load_preference_dataset(make_cfg(tmp_path, tmp_path / "nope.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_dataset(make_cfg(tmp_path, "./no/such/folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        load_preference_dataset(make_cfg(tmp_path, tmp_path / "empty"))


def test_all_rows_bad_raises(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [("a", img_bytes(RED), img_bytes(BLUE), 0.5)])
    with pytest.raises(ValueError, match="no usable preference pairs"):
        load_preference_dataset(make_cfg(tmp_path, path))


def test_load_folder_of_parquet_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "a.parquet", [("a0", img_bytes(RED), img_bytes(BLUE), 1.0)] * 3)
    write_parquet(folder / "b.parquet", [("b0", img_bytes(BLUE), img_bytes(RED), 0.0)] * 2)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk.json").write_text("{}")  # hidden folders are ignored
    ds, report = load_preference_dataset(make_cfg(tmp_path, folder))
    assert report["rows"] == 5 and len(ds) == 5 and sorted(set(ds["caption"])) == ["a0", "b0"]


def test_load_jsonl_with_relative_image_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (20, 20), RED).save(tmp_path / "imgs" / "red.png")
    Image.new("RGB", (20, 20), BLUE).save(tmp_path / "imgs" / "blue.jpg")
    lines = [{"caption": "x", "jpg_0": "imgs/blue.jpg", "jpg_1": "imgs/red.png", "label_0": 0},
             {"caption": "y", "jpg_0": "imgs/red.png", "jpg_1": "imgs/missing.png", "label_0": 1}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = make_cfg(tmp_path, tmp_path / "pairs.jsonl")
    ds, report = load_preference_dataset(cfg)
    assert report["kept"] == 1 and report["skipped"] == {"missing_image_file": 1}  # a path that names no file
    ex = PairDataset(ds, cfg, seed=0)[0]
    assert is_red(ex["pixel_values"][0]) and not is_red(ex["pixel_values"][1])


def test_load_save_to_disk_with_image_feature_and_arrow_file(tmp_path):
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float32")})
    red, blue = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    data = {"caption": ["a", "b", "t"], "jpg_0": [red, blue, red], "jpg_1": [blue, red, red],
            "label_0": [1.0, 0.0, 0.5]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "saved"))
    cfg = make_cfg(tmp_path, tmp_path / "saved")
    ds, report = load_preference_dataset(cfg)
    assert report["kept"] == 2 and report["skipped"] == {"tie": 1}
    pairs = PairDataset(ds, cfg, seed=0)
    assert all(is_red(pairs[i]["pixel_values"][0]) for i in range(2))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    ds2, report2 = load_preference_dataset(make_cfg(tmp_path, arrow_file))
    assert report2["kept"] == 2 and is_red(PairDataset(ds2, cfg, seed=0)[1]["pixel_values"][0])
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict(data, features=features)})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    ds3, _ = load_preference_dataset(make_cfg(tmp_path, tmp_path / "saved_dict", split="test"))
    assert len(ds3) == 2
    with pytest.raises(ValueError, match="data.split"):
        load_preference_dataset(make_cfg(tmp_path, tmp_path / "saved_dict"))


def test_skip_counter_merge_and_json():
    a, b = SkipCounter(), SkipCounter()
    a.skip("tie", 2)
    b.skip("tie")
    b.skip("undecodable_image")
    b.convert("grayscale", 3)
    merged = a.merge(b).as_dict()
    assert merged == {"skipped": {"tie": 3, "undecodable_image": 1}, "converted": {"grayscale": 3}}
    assert a.total_skipped == 4 and json.loads(json.dumps(merged)) == merged


def test_decoding_image_feature_given_directly_never_raises(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = img_bytes(Image.fromarray(noise), fmt="JPEG")
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64")})
    data = {"caption": ["a", "b"], "jpg_0": [{"bytes": full, "path": None}, {"bytes": full[:600], "path": None}],
            "jpg_1": [{"bytes": img_bytes(RED), "path": None}] * 2, "label_0": [0.0, 1.0]}
    ds = datasets.Dataset.from_dict(data, features=features)  # decode=True: datasets would raise on row 1
    pairs = PairDataset(ds, make_cfg(tmp_path, "unused"), seed=0)
    assert is_red(pairs[0]["pixel_values"][0]) and pairs[0]["original_size"].tolist() == [[24, 24], [64, 64]]
    assert pairs[1] == SkippedRow("undecodable_image", 1)


def test_min_score_gap_filter(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(buf, format="PNG")
    png = buf.getvalue()
    rows = {"caption": ["a"] * 5, "jpg_0": [png] * 5, "jpg_1": [png] * 5, "label_0": [1.0, 0.0, 1.0, 0.0, 1.0],
            "score_0": [0.9, 0.1, 0.55, None, 0.5], "score_1": [0.1, 0.9, 0.5, 0.2, 0.5]}
    path = tmp_path / "scored.parquet"
    pq.write_table(pa.table(rows), path)
    _, report = load_preference_dataset(DataConfig(dataset=str(path), resolution=16, min_score_gap=0.3))
    assert report["kept"] == 2 and report["skipped"] == {"small_score_gap": 2, "missing_score": 1}
    _, report = load_preference_dataset(DataConfig(dataset=str(path), resolution=16))
    assert report["kept"] == 5
    with pytest.raises(ValueError, match="data.score_columns"):
        load_preference_dataset(DataConfig(dataset=str(path), resolution=16, min_score_gap=0.3,
                                           score_columns=("r0", "r1")))


# ----------------------------------------------------------------------------------------------------------
# Other layouts, mapped into the Pick-a-Pic schema: each loads to the pairs of the equivalent Pick-a-Pic
# parquet


def noise_png(seed: int, h: int = 20, w: int = 24) -> bytes:
    return img_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)))


def preference_triples(n: int, seed: int = 0) -> list[tuple[str, bytes, bytes]]:
    """n pairs (caption, preferred PNG, rejected PNG) of distinct noise images of varied sizes."""
    base = seed * 1000
    return [(f"caption {i}", noise_png(base + 2 * i, 16 + 2 * i), noise_png(base + 2 * i + 1, 24, 18))
            for i in range(n)]


def pickapic_rows(triples) -> list[tuple]:
    """As Pick-a-Pic stores them: every other pair with the preferred image second (label_0 = 0)."""
    return [(c, win, lose, 1.0) if i % 2 == 0 else (c, lose, win, 0.0)
            for i, (c, win, lose) in enumerate(triples)]


def oriented_pairs(ds, cfg, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    pairs = PairDataset(ds, cfg, seed)
    return [(pairs[i]["caption"], pairs[i]["pixel_values"]) for i in range(len(pairs))]


def assert_same_pairs(got, expected) -> None:
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))


def expected_pairs(tmp_path, triples, **kw):
    """The pairs of the equivalent Pick-a-Pic parquet (bytes in the table, orientation by label)."""
    ds, report, cfg = load(tmp_path, pickapic_rows(triples), **kw)
    assert report["kept"] == len(triples)
    return oriented_pairs(ds, cfg)


def test_no_images_layout_joined_with_image_root(tmp_path):
    triples = preference_triples(6)
    expected = expected_pairs(tmp_path, triples)
    images, meta = tmp_path / "images", tmp_path / "meta"
    images.mkdir()
    meta.mkdir()
    names = ("caption", "image_0_uid", "image_1_uid", "image_0_url", "label_0", "label_1", "are_different")
    table: dict[str, list] = {k: [] for k in names}
    for i, (caption, first, second, label) in enumerate(pickapic_rows(triples)):
        uids = [f"{i:04d}-aa1f", f"{i:04d}-bb2e"]  # uid-like names: no suffix in the table
        for uid, data, suffix in zip(uids, (first, second), (".png", ".jpg" if i % 2 else ".webp")):
            (images / (uid + suffix)).write_bytes(data)  # PIL reads the content, whatever the suffix
        for key, value in zip(table, (caption, *uids, f"https://x/{uids[0]}", label, 1 - label, True)):
            table[key].append(value)
    (images / "lost-0.png").write_bytes(triples[0][1])
    for key, value in zip(table, ("lost file", "lost-0", "lost-1", "", 1.0, 0.0, True)):  # lost-1: no file
        table[key].append(value)
    pq.write_table(pa.table(table), meta / "train.parquet")
    cfg = make_cfg(tmp_path, meta / "train.parquet", image_columns=("image_0_uid", "image_1_uid"),
                   image_root=str(images))
    ds, report = load_preference_dataset(cfg)
    assert report["rows"] == len(triples) + 1 and report["skipped"] == {"missing_image_file": 1}
    assert_same_pairs(oriented_pairs(ds, cfg), expected)
    assert all(path.startswith(str(images)) for path in ds["image_0_uid"])  # resolved, suffix found
    hint = r"no_images.*image_columns=\[image_0_uid, image_1_uid\].*data.image_root"
    with pytest.raises(ValueError, match=hint):
        load_preference_dataset(make_cfg(tmp_path, meta / "train.parquet"))
    with pytest.raises(FileNotFoundError, match="data.image_root"):
        load_preference_dataset(cfg.model_copy(update={"image_root": str(tmp_path / "nope")}))
    with pytest.raises(ValueError, match="missing_image_file.*data.image_root"):  # looked up by the table
        load_preference_dataset(cfg.model_copy(update={"image_root": None}))


def write_pair_folder(root, triples, caption_key: str = "caption") -> None:
    for side in ("w", "l"):
        (root / side / "sub").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (caption, win, lose) in enumerate(triples):
        name = f"sub/{i:03d}.png" if i == 1 else f"{i:03d}.png"
        (root / "w" / name).write_bytes(win)
        (root / "l" / name).write_bytes(lose)
        lines.append({"file_name": name, caption_key: caption, "seed": i})
    (root / "w" / "one_sided.png").write_bytes(triples[0][1])  # listed, but no rejected image
    lines.append({"file_name": "one_sided.png", caption_key: "one sided"})
    for side in ("w", "l"):  # a pair of images without a metadata line: no caption
        (root / side / "zz_unlisted.png").write_bytes(triples[0][2])
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_pair_folder_layout(tmp_path):
    triples = preference_triples(5, seed=1)
    expected = expected_pairs(tmp_path, triples)
    root = tmp_path / "pairs"
    write_pair_folder(root, triples)
    cfg = make_cfg(tmp_path, root)
    ds, report = load_preference_dataset(cfg)
    assert report["rows"] == len(triples) + 2
    assert report["skipped"] == {"missing_image_file": 1, "missing_caption": 1}
    assert_same_pairs(oriented_pairs(ds, cfg), expected)
    other = tmp_path / "text_key"
    write_pair_folder(other, triples, caption_key="text")
    with pytest.raises(ValueError, match="no 'caption' key.*data.caption_column.*'text'"):
        load_preference_dataset(make_cfg(tmp_path, other))
    text_cfg = make_cfg(tmp_path, other, caption_column="text")
    assert_same_pairs(oriented_pairs(load_preference_dataset(text_cfg)[0], text_cfg), expected)
    (root / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_preference_dataset(cfg)


def write_csv(path, header, rows) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_of_paths_default_and_mapped_columns(tmp_path):
    triples = preference_triples(5, seed=2)
    expected = expected_pairs(tmp_path, triples)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i, (caption, win, lose) in enumerate(triples):
        (tmp_path / "imgs" / f"{i}_w.png").write_bytes(win)
        (tmp_path / "imgs" / f"{i}_l.png").write_bytes(lose)
        rows.append([f"{caption}, with a comma", f"imgs/{i}_w.png", f"imgs/{i}_l.png"])
    write_csv(tmp_path / "pairs.csv", ["caption", "preferred", "rejected"], rows)
    cfg = make_cfg(tmp_path, tmp_path / "pairs.csv")
    ds, report = load_preference_dataset(cfg)
    assert report["kept"] == len(triples) and report["skipped"] == {}
    got = oriented_pairs(ds, cfg)
    assert_same_pairs([(c.removesuffix(", with a comma"), px) for c, px in got], expected)
    streamed = list(StreamedPairs(cfg.model_copy(update={"shuffle_buffer": 0}), seed=0))
    assert [e["caption"] for e in streamed] == [c for c, _ in got]
    # Mapped columns: another header, no label (the first image column is the preferred one), two bad rows.
    mapped_rows = [[*row, "x"] for row in rows] + [["lost", "imgs/0_w.png", "imgs/gone.png", "x"],
                                                           ["", "imgs/0_w.png", "imgs/0_l.png", "x"]]
    write_csv(tmp_path / "mapped.csv", ["prompt", "good", "bad", "note"], mapped_rows)
    mapped = make_cfg(tmp_path, tmp_path / "mapped.csv", caption_column="prompt",
                      image_columns=("good", "bad"), label_column=None)
    ds2, report2 = load_preference_dataset(mapped)
    assert report2["skipped"] == {"missing_image_file": 1, "missing_caption": 1}
    assert_same_pairs(oriented_pairs(ds2, mapped), got)
    with pytest.raises(ValueError, match="lacks column 'label_0'.*data.label_column=null"):
        load_preference_dataset(mapped.model_copy(update={"label_column": "label_0"}))
    with pytest.raises(ValueError, match=r"'bda' \(set data.image_columns, e.g. to 'bad'\).*good, bad, note"):
        load_preference_dataset(mapped.model_copy(update={"image_columns": ("good", "bda")}))


def test_hub_style_shards_glob_and_split(tmp_path):
    folder = tmp_path / "snapshot" / "data"
    folder.mkdir(parents=True)
    red, blue = img_bytes(RED), img_bytes(BLUE)
    shards = {"train-00000-of-00002.parquet": ["t0", "t1"], "train-00001-of-00002.parquet": ["t2"],
              "test-00000-of-00001.parquet": ["x0", "x1"]}
    for name, captions in shards.items():
        write_parquet(folder / name, [(c, red, blue, 1.0) for c in captions])
    captions = {split: sorted(c for n, cs in shards.items() if n.startswith(split + "-") for c in cs)
                for split in ("train", "test")}
    for split in ("train", "test"):
        ds, report = load_preference_dataset(make_cfg(tmp_path, tmp_path / "snapshot", split=split))
        assert sorted(ds["caption"]) == captions[split] and report["rows"] == len(captions[split])
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\].*data.split='validation'"):
        load_preference_dataset(make_cfg(tmp_path, tmp_path / "snapshot", split="validation"))
    ds, _ = load_preference_dataset(make_cfg(tmp_path, f"{folder}/train-*.parquet"))
    assert sorted(ds["caption"]) == captions["train"]
    ds, _ = load_preference_dataset(make_cfg(tmp_path, f"{tmp_path}/**/test-*.parquet"))
    assert sorted(ds["caption"]) == captions["test"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_preference_dataset(make_cfg(tmp_path, f"{folder}/valid-*.parquet"))


def test_hub_id_goes_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr("lora_dpo.data.sources.hub_unreachable", lambda: None)  # as if the hub answered
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'yuvalkirstain/pickapic_v2' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = DataConfig(dataset="yuvalkirstain/pickapic_v2", split="validation", resolution=16)
    with pytest.raises(FileNotFoundError, match="pickapic_v2' is not a local path and could not be") as err:
        load_preference_dataset(cfg)
    assert "OfflineModeIsEnabled" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert calls == [(("yuvalkirstain/pickapic_v2",),
                      {"split": "validation", "cache_dir": None, "streaming": False})]
    with pytest.raises(FileNotFoundError, match="could not be loaded"):
        StreamedPairs(cfg.model_copy(update={"streaming": True}), seed=0)
    assert calls[-1][1]["streaming"] is True
    # A reachable hub (faked): its rows go through the same checks, streamed when asked.
    rows = pickapic_rows(preference_triples(3))
    table = datasets.Dataset.from_dict({"caption": [r[0] for r in rows], "jpg_0": [r[1] for r in rows],
                                        "jpg_1": [r[2] for r in rows], "label_0": [r[3] for r in rows],
                                        "are_different": [True, False, True]})
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, **kw: table.to_iterable_dataset() if kw["streaming"] else table)
    ds, report = load_preference_dataset(cfg)
    assert ds["caption"] == [rows[0][0], rows[2][0]] and report["skipped"] == {"not_different": 1}
    stream = StreamedPairs(cfg.model_copy(update={"streaming": True, "shuffle_buffer": 0}), seed=0)
    assert [e["caption"] for e in stream] == ds["caption"]


# ----------------------------------------------------------------------------------------------------------
# Filters: are_different, identical images, duplicates


def test_not_different_identical_and_duplicate_filters(tmp_path):
    x, y, z = noise_png(1), noise_png(2), noise_png(3)
    x_copy = bytes(x)
    # (caption, jpg_0, jpg_1, label_0, are_different) -> the reason each row is dropped (None: kept).
    annotated = [
        (("cat", x, y, 1.0, True), None),
        (("cat", x, y, 1.0, True), "duplicate"),
        (("cat", y, x, 0.0, True), "duplicate"),  # the same preference stored the other way round
        (("cat", y, x, 1.0, True), None),  # the opposite preference: not a duplicate
        (("dog", x, y, 1.0, None), None),  # another caption; are_different unknown -> kept
        (("same", x, x_copy, 1.0, True), "identical_images"),
        (("nd", x, z, 1.0, False), "not_different"),
        (("cat", x, y, 0.5, True), "tie"),
        (("fox", z, y, 0.0, False), "not_different"),
        (("fox", z, y, 0.0, True), None),  # repeats a dropped row only: kept
        (("fox", z, y, 0.0, True), "duplicate"),
    ]
    columns = ["caption", "jpg_0", "jpg_1", "label_0", "are_different"]
    pq.write_table(pa.table({c: [row[k] for row, _ in annotated] for k, c in enumerate(columns)}),
                   tmp_path / "p.parquet")
    cfg = make_cfg(tmp_path, tmp_path / "p.parquet", drop_duplicates=True, drop_identical_images=True)
    expect_kept = [row[0] for row, reason in annotated if reason is None]
    expect_skipped = Counter(reason for _, reason in annotated if reason)
    ds, report = load_preference_dataset(cfg)
    assert ds["caption"] == expect_kept and report["skipped"] == dict(expect_skipped)
    assert report["kept"] + sum(report["skipped"].values()) == report["scanned"] == len(annotated)
    parallel, parallel_report = load_preference_dataset(cfg.model_copy(update={"num_proc": 2}))
    assert parallel["caption"] == expect_kept and parallel_report == report
    # Off: only the metadata filters remain (the hash filters are opt-in; are_different can be turned off).
    _, off = load_preference_dataset(make_cfg(tmp_path, tmp_path / "p.parquet"))
    assert off["skipped"] == {k: v for k, v in expect_skipped.items() if k in ("tie", "not_different")}
    _, none = load_preference_dataset(make_cfg(tmp_path, tmp_path / "p.parquet", are_different_column=None))
    assert none["skipped"] == {"tie": expect_skipped["tie"]}
    with pytest.raises(ValueError, match="data.are_different_column='are_diferent'.*'are_different'"):
        load_preference_dataset(cfg.model_copy(update={"are_different_column": "are_diferent"}))


# ----------------------------------------------------------------------------------------------------------
# Streaming


def same_examples(a, b) -> bool:
    """Two lists of PairDataset examples / SkippedRow markers are equal, tensors included."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, SkippedRow) or isinstance(y, SkippedRow):
            if x != y:
                return False
        elif x.keys() != y.keys() or any(
            not torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] != y[k] for k in x
        ):
            return False
    return True


COUNTS = ("scanned", "kept", "skipped", "converted")


def test_streaming_matches_map_style(tmp_path, messy_pairs):
    table = pq.read_table(messy_pairs[0])
    repeats = 4  # exact copies of the first (good) rows: duplicates
    pq.write_table(pa.concat_tables([table, table.slice(0, repeats)]), tmp_path / "dups.parquet")
    cfg = make_cfg(tmp_path, tmp_path / "dups.parquet", random_crop=True, random_flip=True,
                   caption_dropout=0.3, drop_duplicates=True, shuffle_buffer=0)
    ds, report = load_preference_dataset(cfg)
    assert report["skipped"]["duplicate"] == repeats
    mapped = [PairDataset(ds, cfg, seed=3)[i] for i in range(len(ds))]
    assert any(isinstance(e, SkippedRow) for e in mapped)  # the truncated JPEG fails at decode in both paths
    stream = StreamedPairs(cfg, seed=3)
    assert stream.report()["complete"] is False
    assert same_examples(list(stream), mapped)
    assert {k: stream.report()[k] for k in COUNTS} == {k: report[k] for k in COUNTS}
    assert stream.report()["complete"] and stream.epoch == 1
    epoch1 = list(stream)  # the next pass: the same pairs, new draws
    assert [e.index for e in epoch1 if isinstance(e, SkippedRow)] == [e.index for e in mapped
                                                                       if isinstance(e, SkippedRow)]
    assert not same_examples(epoch1, mapped)
    capped = cfg.model_copy(update={"max_pairs": 5})
    ds5, report5 = load_preference_dataset(capped)
    stream5 = StreamedPairs(capped, seed=3)
    assert same_examples(list(stream5), [PairDataset(ds5, capped, seed=3)[i] for i in range(len(ds5))])
    assert {k: stream5.report()[k] for k in COUNTS} == {k: report5[k] for k in COUNTS}
    with pytest.raises(ValueError, match="StreamedPairs"):
        load_preference_dataset(cfg.model_copy(update={"streaming": True}))


def test_streaming_splits_disjointly_across_ranks(tmp_path):
    rows = [(f"c{i}", noise_png(2 * i), noise_png(2 * i + 1), [1.0, 0.0, 0.5][i % 3]) for i in range(14)]
    (tmp_path / "two").mkdir()
    write_parquet(tmp_path / "two" / "a.parquet", rows[:7])
    write_parquet(tmp_path / "two" / "b.parquet", rows[7:])
    sources = {"one file (every other row)": write_parquet(tmp_path / "one.parquet", rows),
               "two files (a shard each)": tmp_path / "two"}
    for name, source in sources.items():
        for buffer in (0, 4):
            cfg = make_cfg(tmp_path, source, shuffle_buffer=buffer)
            ds, report = load_preference_dataset(cfg)
            shares = [StreamedPairs(cfg, seed=0, num_replicas=2, rank=r) for r in range(2)]
            examples = [list(share) for share in shares]
            captions = [[e["caption"] for e in share] for share in examples]
            assert all(captions) and set(captions[0]).isdisjoint(captions[1]), name
            assert sorted(captions[0] + captions[1]) == sorted(ds["caption"]), name
            indices = [e["index"] for share in examples for e in share]
            assert len(set(indices)) == len(indices)  # distinct per-pair draws across ranks
            merged = merge_reports([share.report() for share in shares])
            assert {k: merged[k] for k in COUNTS} == {k: report[k] for k in COUNTS} and merged["complete"]
            if buffer:
                assert captions != [[c for c in ds["caption"] if c in share] for share in captions], name
    with pytest.raises(ValueError, match="rank"):
        StreamedPairs(cfg, seed=0, num_replicas=2, rank=2)


def test_streaming_resumes_at_the_saved_position(tmp_path):
    rows = [(f"c{i}", noise_png(2 * i), noise_png(2 * i + 1), float(i % 2)) for i in range(8)]
    rows.insert(3, ("tie", noise_png(90), noise_png(91), 0.5))
    rows.append(rows[1])  # a duplicate of a row read before the checkpoint, read after it
    write_parquet(tmp_path / "p.parquet", rows)
    cfg = make_cfg(tmp_path, tmp_path / "p.parquet", shuffle_buffer=0, drop_duplicates=True, random_crop=True,
                   random_flip=True)
    kept = len(load_preference_dataset(cfg)[0])
    batch_size, before = 2, 2
    after = 2 * (kept // batch_size) - before + 1  # runs into the third epoch

    def take(stream, n):
        it = stream.batches(batch_size)
        return [next(it) for _ in range(n)], it

    uninterrupted, _ = take(StreamedPairs(cfg, seed=1), before + after)
    a = StreamedPairs(cfg, seed=1)
    first, it = take(a, before)
    state = json.loads(json.dumps(a.state_dict()))
    rest = [next(it) for _ in range(after)]
    b = StreamedPairs(cfg, seed=1)
    b.load_state_dict(state)
    resumed, _ = take(b, after)
    for got, want in ((first + rest, uninterrupted), (resumed, rest)):
        assert [x.captions for x in got] == [x.captions for x in want]
        assert [x.indices for x in got] == [x.indices for x in want]
        assert all(torch.equal(x.pixel_values, y.pixel_values) for x, y in zip(got, want))
    assert b.epoch == a.epoch == 2 and b.report() == a.report()
    assert a.report()["skipped"] == {"tie": 1, "duplicate": 1} and a.report()["complete"]
    with pytest.raises(ValueError, match="train.seed"):
        StreamedPairs(cfg, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="train.batch_size"):
        next(StreamedPairs(cfg, seed=1).batches(kept + 1))
