"""Faults in the data (issue 15): image paths that leave data.image_root, and data files that cannot be read as a
whole (empty, another text encoding, not what their suffix says) answering with one clear DataError."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lora_dpo.cli import main
from lora_dpo.config import DataConfig, load_config
from lora_dpo.data.images import ImageBase, MissingImage, find_image_file
from lora_dpo.data.pairs import PairDataset
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamedPairs
from lora_dpo.errors import ConfigError, DataError
from lora_dpo.feedback.relabel import relabel_preference_set

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes/sd15/lora_dpo.yaml")


@pytest.fixture(autouse=True)
def _no_stream_sleep(monkeypatch):
    """datasets sleeps 5 s when some parquet streams are closed (arrow issue 45214)."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def jpeg(path: Path, seed: int) -> Path:
    """A real, decodable 24 x 24 JPEG of seeded noise."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


def make_cfg(tmp_path: Path, dataset, **kw) -> DataConfig:
    base = {"resolution": 16, "random_flip": False, "cache_dir": str(tmp_path / "hf_cache"), "shuffle_buffer": 0}
    return DataConfig(dataset=str(dataset), **{**base, **kw})


def path_table(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Pick-a-Pic columns holding image paths / uids (str); label 1: the first image is preferred."""
    captions, first, second = (list(c) for c in zip(*rows))
    pq.write_table(pa.table({"caption": captions, "jpg_0": first, "jpg_1": second, "label_0": [1.0] * len(rows)}),
                   path)
    return path


@pytest.fixture
def spy_reads(monkeypatch) -> list[Path]:
    """Every file the image code opens or reads (PIL.Image.open, Path.read_bytes / Path.open), resolved."""
    opened: list[Path] = []
    pil_open, read_bytes, path_open = PIL.Image.open, Path.read_bytes, Path.open

    def note(target):
        if isinstance(target, (str, os.PathLike)):
            opened.append(Path(target).resolve())

    def spy_pil(fp, *args, **kwargs):
        note(fp)
        return pil_open(fp, *args, **kwargs)

    def spy_read_bytes(self):
        note(self)
        return read_bytes(self)

    def spy_open(self, *args, **kwargs):
        note(self)
        return path_open(self, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", spy_pil)
    monkeypatch.setattr(Path, "read_bytes", spy_read_bytes)
    monkeypatch.setattr(Path, "open", spy_open)
    return opened


@pytest.fixture
def escaping(tmp_path, monkeypatch) -> tuple[Path, Path, list[tuple[str, str, str]]]:
    """An image root with good images and ids that leave it, each naming a real, decodable JPEG outside:
    ``..``, absolute, ``~`` (HOME is a tmp folder), a symlinked file, a symlinked folder, a uid whose suffixed
    file is a symlink, and a ``..`` id that names no file. Two rows stay inside (one through an inner symlink
    and a ``..`` that does not leave). Returns the root, the outside folder and the rows."""
    root, outside, home = tmp_path / "root", tmp_path / "outside", tmp_path / "home"
    for i, name in enumerate(("a.jpg", "sub/b.jpg", "c.jpg")):
        jpeg(root / name, i)
    secret = jpeg(outside / "secret.jpg", 10)
    jpeg(home / "home.jpg", 11)
    monkeypatch.setenv("HOME", str(home))
    (root / "link.jpg").symlink_to(secret)
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "uidlink.jpg").symlink_to(secret)  # the uid "uidlink" finds it through the .jpg suffix
    (root / "inner.jpg").symlink_to(root / "sub" / "b.jpg")  # a symlink that stays inside: fine
    rows = [
        ("kept plain", "a.jpg", "sub/b.jpg"),
        ("dotdot", "a.jpg", "../outside/secret.jpg"),
        ("absolute", str(secret), "a.jpg"),
        ("home", "a.jpg", "~/home.jpg"),
        ("symlinked file", "link.jpg", "a.jpg"),
        ("symlinked folder", "a.jpg", "linkdir/secret.jpg"),
        ("uid to a symlink", "uidlink", "a.jpg"),
        ("dotdot, no file", "a.jpg", "../outside/nothing.jpg"),
        ("kept inner", "sub/../c.jpg", "inner.jpg"),
    ]
    return root, outside, rows


OUTSIDE_ROWS = 7


def test_ids_outside_image_root_are_skipped_and_never_read(tmp_path, escaping, spy_reads):
    root, outside, rows = escaping
    data = path_table(root / "meta.parquet", rows)  # in the root: without image_root, the base is the same
    cfg = make_cfg(tmp_path, data, image_root=str(root), drop_duplicates=True)  # hashing reads files in full
    ds, report = load_preference_dataset(cfg)
    assert report["skipped"] == {"image_outside_root": OUTSIDE_ROWS}
    assert ds["caption"] == ["kept plain", "kept inner"] and report["kept"] == 2
    assert all(Path(p).resolve().is_relative_to(root) for col in ("jpg_0", "jpg_1") for p in ds[col])
    examples = [PairDataset(ds, cfg, seed=0)[i] for i in range(len(ds))]
    assert all(e["pixel_values"].shape == (2, 3, 16, 16) for e in examples)
    stream = StreamedPairs(cfg.model_copy(update={"streaming": True}), seed=0)
    assert [e["caption"] for e in stream] == ["kept plain", "kept inner"]
    assert stream.report()["skipped"] == {"image_outside_root": OUTSIDE_ROWS}
    assert spy_reads and not [p for p in spy_reads if p.is_relative_to(outside) or p.is_relative_to(tmp_path / "home")]
    # The same table without image_root (base: the table's folder, today's behaviour) reads the outside JPEGs.
    _, unconfined = load_preference_dataset(make_cfg(tmp_path, data))
    assert unconfined["kept"] == 8 and unconfined["skipped"] == {"missing_image_file": 1}
    assert any(p.is_relative_to(outside) for p in spy_reads)  # the spy sees outside reads when they happen


def test_find_image_file_confined(escaping):
    root, outside, _ = escaping
    confined, free = ImageBase(root, confined=True), ImageBase(root)
    assert find_image_file("uidlink", free) == root / "uidlink.jpg"
    assert find_image_file("sub/../c", confined) == root / "sub/../c.jpg"
    assert find_image_file("nothing", confined) is None
    for name in ("uidlink", "link.jpg", "linkdir/secret", "../outside/secret", str(outside / "secret.jpg"),
                 "~/home.jpg", "../nowhere"):
        with pytest.raises(MissingImage) as err:
            find_image_file(name, confined)
        assert err.value.reason == "image_outside_root", name


def test_preferred_rejected_csv_with_image_root(tmp_path, escaping, spy_reads):
    root, outside, rows = escaping
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("caption", "preferred", "rejected"), *rows])
    cfg = make_cfg(tmp_path, tmp_path / "pairs.csv", image_root=str(root))
    ds, report = load_preference_dataset(cfg)
    assert report["skipped"] == {"image_outside_root": OUTSIDE_ROWS} and len(ds) == 2
    with open(tmp_path / "bad.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("caption", "preferred", "rejected"), *rows[1:8]])
    with pytest.raises(DataError, match=r"image_outside_root.*must lie inside .*root.*data.image_root"):
        load_preference_dataset(make_cfg(tmp_path, tmp_path / "bad.csv", image_root=str(root)))

    class FirstPixel:
        name = "first_pixel"

        def score(self, images, prompts):
            return np.array([float(img.getpixel((0, 0))[0]) for img in images])

    report = relabel_preference_set(tmp_path / "pairs.csv", FirstPixel(), tmp_path / "out.parquet",
                                    image_root=str(root), cache_dir=str(tmp_path / "hf_cache"))
    assert report["relabelled"] == 2 and report["skipped"] == {"image_outside_root": OUTSIDE_ROWS}
    assert not [p for p in spy_reads if p.is_relative_to(outside)]


def test_pair_folder_symlink_out_is_refused(tmp_path):
    folder, secret = tmp_path / "pairs", jpeg(tmp_path / "outside" / "secret.jpg", 5)
    for i in range(3):
        jpeg(folder / "w" / f"{i}.jpg", 2 * i)
        jpeg(folder / "l" / f"{i}.jpg", 2 * i + 1)
    (folder / "w" / "3.jpg").symlink_to(secret)
    jpeg(folder / "l" / "3.jpg", 7)
    lines = [{"file_name": f"{i}.jpg", "caption": f"pair {i}"} for i in range(4)]
    lines.append({"file_name": "../../outside/secret.jpg", "caption": "escapes"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    ds, report = load_preference_dataset(make_cfg(tmp_path, folder))
    assert ds["caption"] == ["pair 0", "pair 1", "pair 2"] and report["skipped"] == {"image_outside_root": 2}


# ----------------------------------------------------------------------------------------------------------------
# Data sets that cannot be read as a whole


def write_parquet_rows(path: Path, n: int) -> Path:
    pq.write_table(pa.table({"caption": pa.array([f"c{i}" for i in range(n)], pa.string()),
                             "jpg_0": pa.array([b"x"] * n, pa.binary()), "jpg_1": pa.array([b"y"] * n, pa.binary()),
                             "label_0": pa.array([1.0] * n, pa.float64())}), path)
    return path


def both_paths(cfg: DataConfig) -> list:
    """The in-memory load and the stream (its first pass), each run."""
    return [lambda: load_preference_dataset(cfg),
            lambda: list(StreamedPairs(cfg.model_copy(update={"streaming": True}), seed=0))]


@pytest.mark.parametrize("name, content, message", [
    ("empty.parquet", None, r"has no rows \(a parquet file of 0 rows\)"),
    ("zero.parquet", b"", r"has no rows \(an empty file: 0 bytes\)"),
    ("empty.csv", b"", r"has no rows \(an empty file: 0 bytes\)"),
    ("header.csv", b"caption,preferred,rejected\n", "has no rows"),
    ("empty.jsonl", b"", r"has no rows \(an empty file: 0 bytes\)"),
    ("blank.jsonl", b"\n  \n\n", "has no rows"),
    ("garbage.parquet", b"this is not parquet, just text " * 8, r"is not a readable parquet file \(.*magic"),
    ("ragged.csv", b"caption,preferred,rejected\na,b,c\nd,e,f,g,h\n", r"could not be read as csv \(ParserError"),
])
def test_unreadable_or_empty_file_is_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        write_parquet_rows(path, 0)
    else:
        path.write_bytes(content)
    for run in both_paths(make_cfg(tmp_path, path)):
        with pytest.raises(DataError, match=message) as err:
            run()
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_empty_shard_in_a_folder_and_an_all_filtered_set(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet_rows(folder / "a.parquet", 3)
    write_parquet_rows(folder / "b.parquet", 0)
    for run in both_paths(make_cfg(tmp_path, folder)):
        with pytest.raises(DataError, match=r"has no rows in '.*b\.parquet' \(a parquet file of 0 rows, remove it\)"):
            run()
    (folder / "b.parquet").unlink()  # the rows left hold no images: every row is filtered out
    with pytest.raises(DataError, match=r"no usable preference pairs .*undecodable_image': 3"):
        load_preference_dataset(make_cfg(tmp_path, folder))


LATIN = "caf\xe9 cr\xe8me"


def latin1_csv(tmp_path: Path) -> Path:
    jpeg(tmp_path / "w.jpg", 0)
    jpeg(tmp_path / "l.jpg", 1)
    path = tmp_path / "latin.csv"
    path.write_bytes(f"caption,preferred,rejected\n{LATIN},w.jpg,l.jpg\nplain,w.jpg,l.jpg\n".encode("latin-1"))
    return path


def test_latin1_csv_names_data_encoding_and_loads_with_it(tmp_path):
    path = latin1_csv(tmp_path)
    position = len(b"caption,preferred,rejected\ncaf")
    for run in both_paths(make_cfg(tmp_path, path)):
        with pytest.raises(DataError, match=rf"latin\.csv' is not valid utf-8 text \(byte 0xe9 at position "
                                            rf"{position}\): set data.encoding=latin-1 .*iconv -f latin1 -t utf-8"):
            run()
    cfg = make_cfg(tmp_path, path, encoding="latin-1")
    ds, report = load_preference_dataset(cfg)
    assert ds["caption"] == [LATIN, "plain"] and report["kept"] == 2
    assert [e["caption"] for e in StreamedPairs(cfg.model_copy(update={"streaming": True}), seed=0)] == [LATIN, "plain"]


def test_latin1_jsonl_and_a_later_latin1_file_mid_stream(tmp_path):
    """pyarrow's JSON reader does not check UTF-8: the in-memory load would keep undecodable text; and a stream
    meets a bad second file only when it gets there."""
    path = tmp_path / "one.jsonl"
    path.write_bytes((json.dumps({"caption": "ok", "jpg_0": "a.jpg", "jpg_1": "b.jpg", "label_0": 1.0}) + "\n"
                      + f'{{"caption": "{LATIN}", "jpg_0": "a.jpg", "jpg_1": "b.jpg", "label_0": 1.0}}\n')
                     .encode("latin-1"))
    with pytest.raises(DataError, match=r"one\.jsonl' is not valid utf-8 text \(byte 0xe9"):
        load_preference_dataset(make_cfg(tmp_path, path))
    folder = tmp_path / "csvs"
    folder.mkdir()
    jpeg(folder / "w.jpg", 0)
    jpeg(folder / "l.jpg", 1)
    (folder / "a.csv").write_text("caption,preferred,rejected\nfine,w.jpg,l.jpg\n")
    (folder / "b.csv").write_bytes(f"caption,preferred,rejected\n{LATIN},w.jpg,l.jpg\n".encode("latin-1"))
    stream = StreamedPairs(make_cfg(tmp_path, folder, streaming=True), seed=0)  # the first file reads fine
    with pytest.raises(DataError, match=r"b\.csv' is not valid utf-8 text .*data.encoding"):
        list(stream)


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(ValueError, match="not a text encoding"):
        DataConfig(encoding="utf-nine")
    with pytest.raises(ConfigError, match="data.encoding"):
        load_config(RECIPE, ["data.encoding=utf-nine"])


def test_cli_latin1_csv_is_one_error_line(tiny_sd15, tmp_path, capsys):
    path = latin1_csv(tmp_path)
    code = main(["validate", RECIPE, f"model.pretrained_model_name_or_path={tiny_sd15}", f"data.dataset={path}",
                 "data.resolution=16", f"data.cache_dir={tmp_path / 'hf_cache'}", f"output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert str(path) in lines[0] and "data.encoding=latin-1" in lines[0] and "iconv" in lines[0]
    assert "Traceback" not in err
