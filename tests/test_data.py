"""Tests for lora_dpo.data: loading/filtering, pair processing, collation, sampling. All data is built here."""

from __future__ import annotations

import io
import json
import logging

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lora_dpo.config import DataConfig
from lora_dpo.data import (
    PairBatch,
    PairSampler,
    PreferencePairs,
    SkipCounter,
    SkippedRow,
    build_dataloader,
    collate_pairs,
    load_preference_dataset,
)

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
    with caplog.at_level(logging.INFO, logger="lora_dpo.data"):
        ds, report, cfg = load(tmp_path, rows)
    assert report["rows"] == 8 and report["kept"] == 2 and report["scanned"] == 8
    assert report["skipped"] == {
        "tie": 2, "bad_label": 1, "missing_caption": 1, "missing_image": 1, "undecodable_image": 1
    }
    json.dumps(report)
    assert any("2 kept" in r.getMessage() for r in caplog.records)
    assert ds["caption"] == ["w first", "w second"]
    pairs = PreferencePairs(ds, cfg, seed=0)
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
    pairs = PreferencePairs(ds, cfg, seed=0)
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
    pairs = PreferencePairs(ds, cfg, seed=0)
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
    px = PreferencePairs(ds, cfg, seed=0)[0]["pixel_values"][0]
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
        pairs = PreferencePairs(ds, cfg, seed=seed)
        for i in range(len(pairs)):
            ex = pairs[i]
            assert torch.equal(ex["pixel_values"][0], ex["pixel_values"][1])
            assert torch.equal(ex["crop_top_left"][0], ex["crop_top_left"][1])
            crops.add((i % 2, *ex["crop_top_left"][0].tolist()))
            flipped = PreferencePairs(ds, cfg.model_copy(update={"random_flip": False}), seed=seed)[i]
            flips.add(not torch.equal(flipped["pixel_values"], ex["pixel_values"]))
    assert flips == {True, False} and len({c for c in crops if c[0]}) > 3 and len({c for c in crops if not c[0]}) > 3


def test_crop_positions_are_per_image_and_share_fractions(tmp_path):
    # No resize needed (short side 16 == R): img_w 32x16 (h x w), img_l 16x48; coordinates readable from pixels.
    a, b = img_bytes(coord_image(32, 16)), img_bytes(coord_image(16, 48))
    ds, _, cfg = load(tmp_path, [("c", a, b, 1.0), ("c", b, a, 0.0)] * 10)
    center = PreferencePairs(ds, cfg, seed=0)[0]
    assert center["original_size"].tolist() == [[32, 16], [16, 48]]
    assert center["crop_top_left"].tolist() == [[8, 0], [0, 16]]
    rand_cfg = cfg.model_copy(update={"random_crop": True})
    tops, lefts = [], []
    for i in range(20):
        ex = PreferencePairs(ds, rand_cfg, seed=3)[i]
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
    pairs = PreferencePairs(ds, cfg, seed=5)
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
    half = PreferencePairs(ds, cfg.model_copy(update={"caption_dropout": 0.5}), seed=0)
    dropped = sum(half[i]["caption"] == "" for i in range(400))
    assert 150 <= dropped <= 250  # Binomial(400, 0.5): sd = 10
    never = PreferencePairs(ds, cfg, seed=0)
    assert all(never[i]["caption"] == f"caption {i}" for i in range(400))


# ----------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_epoch_index_is_identical_other_epoch_differs(tmp_path):
    noise = [img_bytes(Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 28, 3), dtype=np.uint8)))
             for i in range(2)]
    ds, _, _ = load(tmp_path, [("c", noise[0], noise[1], 1.0)] * 16)
    cfg = make_cfg(tmp_path, "unused", random_crop=True, random_flip=True, caption_dropout=0.3)
    a, b = PreferencePairs(ds, cfg, seed=7), PreferencePairs(ds, cfg, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    for i in (0, 5, 15):
        ea, eb = a[i], b[i]
        assert torch.equal(ea["pixel_values"], eb["pixel_values"]) and ea["caption"] == eb["caption"]
        assert torch.equal(ea["crop_top_left"], eb["crop_top_left"])
    b.set_epoch(3)
    assert any(not torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) for i in range(16))
    c = PreferencePairs(ds, cfg, seed=8)
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
    pairs = PreferencePairs(ds, cfg, seed=0)
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
    assert report["kept"] == 1 and report["skipped"] == {"missing_image": 1}
    ex = PreferencePairs(ds, cfg, seed=0)[0]
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
    pairs = PreferencePairs(ds, cfg, seed=0)
    assert all(is_red(pairs[i]["pixel_values"][0]) for i in range(2))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    ds2, report2 = load_preference_dataset(make_cfg(tmp_path, arrow_file))
    assert report2["kept"] == 2 and is_red(PreferencePairs(ds2, cfg, seed=0)[1]["pixel_values"][0])
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
    pairs = PreferencePairs(ds, make_cfg(tmp_path, "unused"), seed=0)
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
