"""Diffusion-KTO's data path: an unpaired set (one labeled image per row) and a pair set read as labeled images, then
``loss.type=kto`` through the real CLI on SD1.5- and SDXL-style pipelines."""

from __future__ import annotations

import csv
import math

import pyarrow.parquet as pq
import pytest
import torch
from test_train import ROOT, _args, _metrics

from lora_dpo.cli import main
from lora_dpo.config import ConfigError, DataConfig, LossConfig, load_config
from lora_dpo.data.pairs import PairDataset
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.unpaired import ImageBatch, LabeledImages, collate_images


@pytest.fixture(scope="module")
def unpaired_csv(photo_pairs, tmp_path_factory):
    """A CSV ``caption,image,label`` of image files (relative paths): the preferred and the rejected image of the first
    3 non-tie photo pairs, labelled 1 and 0, then a row with the label 2 and a row naming a missing file."""
    folder = tmp_path_factory.mktemp("unpaired")
    (folder / "images").mkdir()
    table = pq.read_table(photo_pairs).to_pylist()
    rows, expected = [], []
    for i, row in enumerate(r for r in table if r["label_0"] != 0.5):
        if i == 3:
            break
        preferred, rejected = (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1.0 else (row["jpg_1"], row["jpg_0"])
        for side, data, label in (("w", preferred, 1), ("l", rejected, 0)):
            name = f"images/{i}_{side}.jpg"
            (folder / name).write_bytes(data)
            rows.append((row["caption"], name, label))
            expected.append((row["caption"], label == 1))
    rows.append(("a bad label", "images/0_w.jpg", 2))
    rows.append(("a missing file", "images/nowhere.jpg", 1))
    path = folder / "labeled.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["caption", "image", "label"])
        writer.writerows(rows)
    return path, expected


def test_an_unpaired_set_loads_checked_and_labeled(unpaired_csv):
    path, expected = unpaired_csv
    cfg = DataConfig(dataset=str(path), unpaired=True, resolution=32, random_flip=False)
    rows, report = load_preference_dataset(cfg)
    assert report["rows"] == 8 and report["kept"] == 6
    assert report["skipped"] == {"bad_label": 1, "missing_image_file": 1}
    images = LabeledImages(rows, cfg, seed=0)
    assert len(images) == 6
    examples = [images[i] for i in range(6)]
    assert [(e["caption"], e["desirable"]) for e in examples] == expected
    assert examples[0]["pixel_values"].shape == (1, 3, 32, 32) and examples[0]["original_size"].tolist() == [[48, 48]]
    batch = collate_images(examples[:4])
    assert isinstance(batch, ImageBatch) and len(batch) == 4
    assert batch.desirable.tolist() == [True, False, True, False]
    assert batch.pixel_values.shape == (4, 3, 32, 32) and batch.original_size.shape == (4, 2)
    assert batch.target_size.tolist() == [[32, 32]] * 4
    assert len(set(batch.draw_seeds)) == 4  # each image its own noise and timestep


def test_a_pair_set_is_read_as_its_preferred_and_rejected_images(photo_pairs):
    cfg = DataConfig(dataset=str(photo_pairs), resolution=32, random_flip=False)
    rows, report = load_preference_dataset(cfg)
    pairs, images = PairDataset(rows, cfg, seed=0), LabeledImages(rows, cfg, seed=0)
    assert len(images) == 2 * len(pairs) == 2 * report["kept"]
    for i in (0, 5, len(pairs) - 1):
        pair = pairs[i]
        preferred, rejected = images[2 * i], images[2 * i + 1]
        assert preferred["desirable"] is True and rejected["desirable"] is False
        assert torch.equal(preferred["pixel_values"][0], pair["pixel_values"][0])  # x_w
        assert torch.equal(rejected["pixel_values"][0], pair["pixel_values"][1])  # x_l
        assert preferred["caption"] == rejected["caption"] == pair["caption"]
        assert preferred["draw_seed"] != rejected["draw_seed"]


def test_columns_that_do_not_fit_the_layout_are_named(photo_pairs, unpaired_csv):
    with pytest.raises(ValueError, match="data.image_column.*data.desirable_column|data.desirable_column"):
        load_preference_dataset(DataConfig(dataset=str(photo_pairs), unpaired=True))
    with pytest.raises(ValueError, match="set data.unpaired=true and loss.type=kto"):
        load_preference_dataset(DataConfig(dataset=str(unpaired_csv[0])))


@pytest.mark.parametrize("bad, message", [
    (["data.unpaired=true"], "trains loss.type=kto only"),
    (["loss.type=kto", "data.latent_cache=/tmp/nowhere"], "not supported with it yet"),
    (["loss.type=kto", "data.streaming=true"], "not supported with it yet"),
    (["loss.kto_beta=10"], "applies to loss.type=kto"),
    (["loss.type=kto", "data.unpaired=true", "data.min_score_gap=0.1"], "does not apply to unpaired data"),
])
def test_kto_options_that_do_not_fit_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "recipes/sd15/lora_dpo.yaml", bad)


def test_kto_trains_on_an_unpaired_set_through_the_cli(unpaired_csv, tiny_sd15, tmp_path):
    path, _ = unpaired_csv
    out = tmp_path / "run"
    # all 6 kept images (3 desirable, 3 undesirable) in every step
    options = ["loss.type=kto", "data.unpaired=true", "loss.kto_beta=100", "loss.desirable_weight=2.0",
               "train.batch_size=6", "train.max_steps=2", "data.random_flip=false"]
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"), *_args(tiny_sd15, path, out, *options)]) == 0
    first, last = _metrics(out)
    # a fresh adapter: g = 0 and z = 0 for every image, so each loses λ_y·(1 - σ(0)) = λ_y / 2
    assert first["loss"] == pytest.approx((2.0 * 3 + 1.0 * 3) / 6 / 2, abs=1e-6)
    assert first["kl"] == 0.0 and first["rewards/chosen"] == pytest.approx(0.0, abs=1e-9)
    assert first["images_per_second"] > 0 and "mse/chosen" in first and "mse/rejected" in first
    assert math.isfinite(last["loss"]) and last["rewards/chosen"] != 0.0 and last["kl"] >= 0.0
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"])
    card = (out / "README.md").read_text()
    assert "Diffusion-KTO" in card and LossConfig(type="kto", kto_beta=100, desirable_weight=2.0).describe() in card
    assert "6 labeled images kept of" in card.replace("\n  ", " ")
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_kto_trains_an_sdxl_pipeline_on_pairs(photo_pairs, tiny_sdxl, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/sdxl/lora_dpo.yaml"),
                 *_args(tiny_sdxl, photo_pairs, out, "loss.type=kto", "train.batch_size=4", "train.max_steps=2")]) == 0
    first, last = _metrics(out)
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and math.isfinite(last["loss"])
    report = (out / "data_report.json").read_text()
    assert '"labeled_images"' in report


def test_kto_runs_one_reference_and_one_policy_pass_over_the_images(unpaired_csv, tiny_sd15, tmp_path):
    from test_loss_family import run_counting_unet_calls

    from lora_dpo.data.loader import build_dataloader
    from lora_dpo.training.steps import kto_micro_step

    cfg = load_config(None, _args(tiny_sd15, unpaired_csv[0], tmp_path / "run", "loss.type=kto", "data.unpaired=true"))
    rows, _ = load_preference_dataset(cfg.data)
    batch = next(iter(build_dataloader(LabeledImages(rows, cfg.data, 0), cfg.data, 3, seed=0)))
    calls, (loss, metrics) = run_counting_unet_calls(kto_micro_step, cfg, batch)
    assert calls == [3, 3] and loss.shape == (3,)  # the reference pass, then the policy pass, 3 images each
    assert metrics["timestep"].shape == (3,) and len(set(metrics["timestep"].tolist())) > 1
    counts = metrics["rewards/chosen:count"] + metrics["rewards/rejected:count"]
    assert counts.item() == 3 and metrics["rewards/chosen:count"].item() == batch.desirable.sum().item()
