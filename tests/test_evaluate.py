"""``lora-dpo eval``: statistics by hand, picture sizes, and a tiny trained run evaluated end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.evaluation.figures import moving_average, plot_training_curves
from lora_dpo.evaluation.implicit_reward import implicit_reward_accuracy, load_exported_adapter
from lora_dpo.evaluation.report import Scores, change_marks, digit_changes, format_summary
from lora_dpo.evaluation.run import CHANGES_FILE, evaluate_run
from lora_dpo.evaluation.stats import (
    bootstrap_interval,
    diversity,
    mean_pairwise_l2,
    wilson_interval,
    win_outcomes,
    win_rate,
)
from lora_dpo.inference.grids import FRAME_WIDTH, MARK_COLORS, grid_size, make_grid, tile_size
from lora_dpo.models.lora_files import WEIGHT_NAME

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a handwritten digit seven", "a photo of a cat"]
SEEDS = 3
STEPS = 3
Z2 = 1.959963984540054**2


def _solid(value: int, size: int = 2) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


# ----------------------------------------------------------------------------------------------------------
# Statistics, by hand


def test_win_rate_counts_ties_half():
    tuned, base = [3.0, 2.0, 1.0, 5.0], [1.0, 2.0, 4.0, 0.0]  # win, tie, loss, win
    assert win_outcomes(tuned, base).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert win_rate(tuned, base) == pytest.approx(2.5 / 4)
    assert win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(4, 4)  # all wins: [n / (n + z²), 1]
    assert lo == pytest.approx(4 / (4 + Z2), abs=1e-12) and hi == 1.0
    assert wilson_interval(400, 400)[0] == pytest.approx(400 / (400 + Z2)) and 400 / (400 + Z2) > 0.99
    # p = 0.5, n = 100: centre 0.5, half-width z/(1 + z²/n) · sqrt(0.25/n + z²/(4n²))
    half = math.sqrt(Z2) / (1 + Z2 / 100) * math.sqrt(0.25 / 100 + Z2 / 40000)
    assert wilson_interval(50, 100) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert half == pytest.approx(0.09617, abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0
    lo, hi = wilson_interval(2.5, 4)  # ties as half wins
    assert lo < 2.5 / 4 < hi
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_bootstrap_interval():
    assert bootstrap_interval(np.ones(50)) == (1.0, 1.0)  # all wins: the bootstrap collapses at 1
    values = np.array([1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5])
    lo, hi = bootstrap_interval(values)
    assert lo < values.mean() < hi and 0 <= lo and hi <= 1
    assert bootstrap_interval(values) == (lo, hi)  # fixed seed: deterministic
    # 200 wins and 200 losses: close to the normal interval 0.5 ± 1.96·sqrt(0.25/400) = 0.5 ± 0.049
    lo, hi = bootstrap_interval(np.repeat([0.0, 1.0], 200))
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)


def test_diversity_by_hand():
    assert mean_pairwise_l2([_solid(90), _solid(90), _solid(90)]) == 0.0  # identical images
    # 2x2 RGB = 12 values; pixels 0, 1 and 0.2: distances sqrt(12)·{1, 0.2, 0.8}, mean sqrt(12)·2/3
    expected = math.sqrt(12) * 2 / 3
    assert mean_pairwise_l2([_solid(0), _solid(255), _solid(51)]) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(mean_pairwise_l2([_solid(0)]))
    images = [_solid(0), _solid(255), _solid(7), _solid(7), _solid(1)]
    groups = ["a", "a", "b", "b", "c"]  # a: sqrt(12); b: 0; c has one image and is left out
    assert diversity(images, groups) == pytest.approx(math.sqrt(12) / 2, rel=1e-6)


def test_moving_average():
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.5, 2.5, 3.5]
    assert moving_average([1, 2], 3).size == 0


# ----------------------------------------------------------------------------------------------------------
# Pictures


def test_grid_has_the_exact_size_and_places_tiles():
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))  # noqa: E731
    base = [[image() for _ in range(3)] for _ in range(2)]
    tuned = [[image() for _ in range(3)] for _ in range(2)]
    grid = make_grid(["a handwritten digit seven", "a very long prompt " * 20], base, tuned)
    # side column 44 + 3 tiles of 32·3 = 96 px; per prompt a 16 px label strip + base row + tuned row
    assert grid.size == (44 + 3 * 96, 2 * (16 + 2 * 96)) == (332, 416) == grid_size(2, 3, 96)
    arr = np.asarray(grid)
    # prompt 1, tuned row, column 2: the image enlarged ×3 with NEAREST
    y, x = 16 + 2 * 96 + 16 + 96, 44 + 2 * 96
    assert np.array_equal(arr[y:y + 96:3, x:x + 96:3], np.asarray(tuned[1][2]))
    assert np.array_equal(arr[16:16 + 96:3, 44:44 + 96:3], np.asarray(base[0][0]))
    assert tile_size(32) == 96 and tile_size(64) == 64 and tile_size(512) == 256 and tile_size(20) == 80
    big = make_grid(["x"], [[_solid(10, 512)]], [[_solid(20, 512)]])
    assert big.size == (44 + 256, 16 + 2 * 256)
    with pytest.raises(ValueError):
        make_grid(["x", "y"], base, tuned[:1])


def _frame_mask(shape: tuple[int, ...], x: int, y: int, tile: int) -> np.ndarray:
    """True on the FRAME_WIDTH pixels along the inner edges of the tile at (x, y)."""
    mask = np.zeros(shape[:2], dtype=bool)
    mask[y:y + tile, x:x + tile] = True
    mask[y + FRAME_WIDTH:y + tile - FRAME_WIDTH, x + FRAME_WIDTH:x + tile - FRAME_WIDTH] = False
    return mask


def _expected_frames(shape: tuple[int, ...], marks: list[list], tile: int = 96) -> dict[str, np.ndarray]:
    """Per mark, the pixels its frames cover: both tiles (base and tuned) of each marked column."""
    frames = {kind: np.zeros(shape[:2], dtype=bool) for kind in MARK_COLORS}
    for i, row in enumerate(marks):
        for j, mark in enumerate(row):
            for r in (0, 1) if mark else ():
                y = i * (16 + 2 * tile) + 16 + r * tile
                frames[mark] |= _frame_mask(shape, 44 + j * tile, y, tile)
    return frames


def _assert_marked(marked: np.ndarray, plain: np.ndarray, marks: list[list]) -> None:
    """``marked`` is ``plain`` with a green frame on the fixed columns and a red one on the broken columns, both
    tiles each, and nothing else changed."""
    frames = _expected_frames(plain.shape, marks)
    for kind, mask in frames.items():
        assert (marked[mask] == MARK_COLORS[kind]).all(), kind
    untouched = ~(frames["fixed"] | frames["broken"])
    assert np.array_equal(marked[untouched], plain[untouched])


def test_grid_marks_frame_fixed_and_broken_columns():
    rng = np.random.default_rng(1)
    image = lambda: Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))  # noqa: E731
    base = [[image() for _ in range(3)] for _ in range(2)]
    tuned = [[image() for _ in range(3)] for _ in range(2)]
    prompts = ["a handwritten digit seven", "a handwritten digit one"]
    marks = [[None, "fixed", "broken"], ["broken", None]]  # a row may be shorter than its images
    plain = np.asarray(make_grid(prompts, base, tuned))
    marked = np.asarray(make_grid(prompts, base, tuned, marks=marks))
    assert marked.shape == plain.shape == (2 * (16 + 2 * 96), 44 + 3 * 96, 3)  # the same size
    _assert_marked(marked, plain, marks)
    assert MARK_COLORS["fixed"] == (0, 170, 0) and MARK_COLORS["broken"] == (220, 0, 0) and FRAME_WIDTH == 3
    # each frame: 4·96·3 - 4·3² pixels on each of its two tiles
    assert _expected_frames(plain.shape, marks)["broken"].sum() == 2 * 2 * (4 * 96 * 3 - 4 * 9)
    assert np.array_equal(np.asarray(make_grid(prompts, base, tuned, marks=[[None], []])), plain)
    wide = make_grid(prompts, base, tuned, min_cols=5)
    assert wide.size == grid_size(2, 5, 96) and np.asarray(wide)[16:112, 44 + 4 * 96:].min() == 255  # blank
    with pytest.raises(ValueError, match="unknown marks"):
        make_grid(prompts, base, tuned, marks=[["fixd"], []])
    with pytest.raises(ValueError, match="one per prompt"):
        make_grid(prompts, base, tuned, marks=[["fixed"]])


def test_digit_changes_by_hand():
    correct_base = np.array([True, False, True, False, True, False])
    correct_tuned = np.array([True, True, False, False, False, True])
    scores = Scores(np.zeros(6), np.zeros(6), np.full(6, 0.5), correct_base, correct_tuned)
    assert change_marks(scores) == [None, "fixed", "broken", None, "broken", "fixed"]
    prompts = ["seven"] * 3 + ["one"] * 3
    changes = digit_changes(scores, prompts, [10, 11, 12] * 2)
    assert changes == {"fixed": 2, "broken": 2,
                       "fixed_comparisons": [{"prompt": "seven", "seed": 11}, {"prompt": "one", "seed": 12}],
                       "broken_comparisons": [{"prompt": "seven", "seed": 12}, {"prompt": "one", "seed": 11}]}
    assert changes["fixed"] == int((correct_tuned & ~correct_base).sum())
    assert changes["broken"] == int((correct_base & ~correct_tuned).sum())
    no_digits = Scores(np.zeros(6), np.zeros(6), np.full(6, 0.5))
    assert change_marks(no_digits) is None
    assert set(digit_changes(no_digits, prompts, [0] * 6).values()) == {None}
    with pytest.raises(ValueError):
        digit_changes(scores, prompts[:5], [0] * 6)


def test_training_curves_png(tmp_path):
    rows = [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/accuracies": min(1.0, 0.05 * s),
             "rewards/margins": 0.1 * s} for s in range(1, 31)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    with Image.open(out) as png:
        assert png.size == (1260, 340)  # 3 panels of 4.2 x 3.4 inches at 100 dpi
        assert np.asarray(png.convert("L")).std() > 5  # something was drawn
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------------------
# A tiny trained run, evaluated


def _train(family: str, model: Path, data: Path, out: Path, steps: int) -> Path:
    """A tiny run through the real CLI; lr 1e-2 so that the adapter is clearly non-zero after a few steps."""
    code = main(["train", str(ROOT / f"recipes/{family}/lora_dpo.yaml"),
                 f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", "data.resolution=32",
                 f"output.dir={out}", "train.batch_size=2", f"train.max_steps={steps}", "optim.name=adamw",
                 "optim.lr=1e-2", "optim.lr_scheduler=constant", "output.tensorboard=false",
                 "train.mixed_precision=no", "train.gradient_checkpointing=false"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def trained_run(tiny_sd15, photo_pairs, tmp_path_factory) -> Path:
    return _train("sd15", tiny_sd15, photo_pairs, tmp_path_factory.mktemp("eval") / "run", steps=3)


@pytest.fixture(scope="module")
def evaluated(trained_run, photo_pairs, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval") / "out"
    report = evaluate_run(trained_run, scorer_spec="jpeg", prompts=PROMPTS, seeds_per_prompt=SEEDS,
                          heldout_pairs=photo_pairs, max_heldout_pairs=8, implicit_draws=4, num_inference_steps=STEPS,
                          out_dir=out, save_images=True)
    return report, out


def test_exported_adapter_equals_the_last_checkpoint(trained_run):
    exported = load_exported_adapter(trained_run)
    checkpoint = load_file(trained_run / "checkpoints/step_3/trainable_weights.safetensors")
    assert exported.keys() == checkpoint.keys()
    assert all(torch.equal(exported[k], checkpoint[k]) for k in checkpoint)
    assert max(v.abs().max().item() for k, v in checkpoint.items() if "lora_B" in k) > 1e-3  # not zero


def test_eval_json_has_every_field_with_sane_values(evaluated):
    report, out = evaluated
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == report
    assert report["n_comparisons"] == len(PROMPTS) * SEEDS == 6
    assert report["wins"] + report["ties"] + report["losses"] == 6
    assert 0 <= report["win_rate"] <= 1
    for key in ("win_rate_ci95", "win_rate_ci95_bootstrap"):
        lo, hi = report[key]
        assert 0 <= lo <= report["win_rate"] <= hi <= 1
    assert report["win_rate"] == pytest.approx((report["wins"] + 0.5 * report["ties"]) / 6)
    for key in ("reward_base_mean", "reward_tuned_mean", "reward_base_std", "reward_tuned_std"):
        assert math.isfinite(report[key])
    assert report["reward_base_mean"] < 0  # JPEG compressibility: minus kilobytes
    # the JPEG scorer has no predict(): no accuracy
    assert report["accuracy_base"] is None and report["accuracy_delta_points"] is None
    assert report["fixed"] is report["broken"] is report["fixed_comparisons"] is None  # nor fixed / broken
    assert report["files"]["changes_grid"] is None and not (out / CHANGES_FILE).exists()
    assert report["settings"]["reference_adapter"] is None
    assert report["diversity_base"] > 0 and report["diversity_tuned"] > 0 and report["diversity_ratio"] > 0
    assert report["diversity_ratio"] == pytest.approx(report["diversity_tuned"] / report["diversity_base"])
    implicit = report["implicit_reward"]
    assert implicit["n_pairs"] == 8 and implicit["draws"] == 4 and implicit["beta"] == 5000.0
    assert report["implicit_reward_accuracy"] == implicit["accuracy"] and 0 <= implicit["accuracy"] <= 1
    assert math.isfinite(report["implicit_reward_margin_mean"]) and 0 <= implicit["per_draw_accuracy"] <= 1
    settings = report["settings"]
    assert settings["prompts"] == PROMPTS and settings["seeds"] == [10_000, 10_001, 10_002]
    assert settings["num_inference_steps"] == STEPS and settings["guidance_scale"] == 3.0
    assert settings["scorer"] == "jpeg_compressibility" and settings["resolution"] == 32
    assert [p["prompt"] for p in report["per_prompt"]] == PROMPTS
    assert report["wall_time_s"] > 0 and report["timing_s"]["implicit_reward_s"] > 0
    assert report["files"]["grid"] == str(out / "eval_grid.png")
    assert report["files"]["training_curves"] == str(out / "training_curves.png")


def test_eval_pictures(evaluated):
    report, out = evaluated
    with Image.open(report["files"]["grid"]) as grid:
        assert grid.size == (44 + SEEDS * 96, len(PROMPTS) * (16 + 2 * 96))
    with Image.open(report["files"]["training_curves"]) as curves:
        curves.load()
        assert curves.size == (1260, 340)


def test_base_images_are_adapter_free_and_tuned_images_are_not(evaluated, tiny_sd15, trained_run):
    from diffusers import StableDiffusionPipeline

    from lora_dpo.inference.sampling import generate_images

    report, out = evaluated
    names = [f"{i:03d}_{s}.png" for i in range(len(PROMPTS)) for s in report["settings"]["seeds"]]
    saved = {kind: [np.asarray(Image.open(out / "eval_samples" / kind / n)) for n in names]
             for kind in ("base", "tuned")}
    prompts = [p for p in PROMPTS for _ in range(SEEDS)]
    seeds = report["settings"]["seeds"] * len(PROMPTS)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None,
                                                   requires_safety_checker=False)
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=32, width=32)
    fresh = [np.asarray(im) for im in generate_images(pipe, prompts, seeds, **kw)]
    assert all(np.array_equal(a, b) for a, b in zip(fresh, saved["base"]))  # the base really had no adapter
    pipe.load_lora_weights(trained_run)
    adapted = [np.asarray(im) for im in generate_images(pipe, prompts, seeds, **kw)]
    # the tuned set had it (fused for sampling: the rounding moves a pixel by one level at most)
    assert all(np.abs(a.astype(np.int16) - b).max() <= 1 for a, b in zip(adapted, saved["tuned"]))
    assert report["identical_images"] < 6
    assert sum(not np.array_equal(a, b) for a, b in zip(saved["base"], saved["tuned"])) == 6 - report[
        "identical_images"] > 0


def test_implicit_reward_is_reproducible_and_zero_for_a_zero_adapter(evaluated, trained_run, photo_pairs,
                                                                     tmp_path):
    report, _ = evaluated
    cfg = load_config(trained_run / "recipe.yaml")
    again = implicit_reward_accuracy(trained_run, cfg, photo_pairs, max_pairs=8)
    assert again["margin_mean"] == report["implicit_reward"]["margin_mean"]  # fixed (t, noise) draws
    assert again["accuracy"] == report["implicit_reward"]["accuracy"]
    # An adapter of zeros: policy = reference on the SAME t and noise, so every margin is exactly 0.
    zero_run = tmp_path / "zero"
    shutil.copytree(trained_run, zero_run, ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(zero_run / WEIGHT_NAME)
    zeroed = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in weights.items()}
    save_file(zeroed, zero_run / WEIGHT_NAME)
    zero = implicit_reward_accuracy(zero_run, cfg, photo_pairs, max_pairs=4, draws=2)
    assert zero["margin_mean"] == 0.0 and zero["margin_std"] == 0.0
    assert zero["accuracy"] == 0.0 and zero["per_draw_accuracy"] == 0.0  # strict u > 0, as in training


class _SevenEverywhere:
    """A stand-in digit classifier: every image is a 7; reward = mean brightness."""

    name = "seven_everywhere"

    def score(self, images, prompts):
        return np.array([np.asarray(im, dtype=np.float64).mean() for im in images])

    def predict(self, images):
        return np.full(len(images), 7)


def test_accuracy_fields_with_a_digit_scorer(trained_run, tmp_path):
    prompts = ["a handwritten digit seven", "a handwritten digit one"]
    report = evaluate_run(trained_run, scorer_spec=_SevenEverywhere(), prompts=prompts, seeds_per_prompt=2,
                          num_inference_steps=1, out_dir=tmp_path, grid_prompts=1, grid_seeds=1)
    assert report["accuracy_base"] == report["accuracy_tuned"] == 0.5
    assert report["accuracy_delta_points"] == 0.0
    assert [p["accuracy_tuned"] for p in report["per_prompt"]] == [1.0, 0.0]
    assert report["implicit_reward"] is None and report["implicit_reward_accuracy"] is None
    assert report["settings"]["scorer"] == "seven_everywhere"
    with Image.open(tmp_path / "eval_grid.png") as grid:
        assert grid.size == (44 + 96, 16 + 2 * 96)
    # every image is read as a 7, base and tuned alike: nothing fixed or broken, no changes grid
    assert report["fixed"] == report["broken"] == 0
    assert report["fixed_comparisons"] == report["broken_comparisons"] == []
    assert report["files"]["changes_grid"] is None and not (tmp_path / CHANGES_FILE).exists()
    assert "fixed 0, broken 0" in format_summary(report)


class _Scripted:
    """A stand-in digit classifier whose predictions are given: the base set's, then the tuned set's (the order in
    which evaluate_run asks); reward = mean brightness."""

    name = "scripted"

    def __init__(self, *predictions):
        self.predictions = [np.asarray(p) for p in predictions]

    def score(self, images, prompts):
        return np.array([np.asarray(im, dtype=np.float64).mean() for im in images])

    def predict(self, images):
        assert len(self.predictions[0]) == len(images)
        return self.predictions.pop(0)


def test_fixed_and_broken_comparisons(trained_run, tmp_path):
    prompts = ["a handwritten digit seven", "a handwritten digit one"]  # targets 7, 7, 7, 1, 1, 1
    base_pred, tuned_pred = [7, 0, 7, 1, 0, 0], [7, 7, 0, 0, 1, 0]
    # by hand: base right at 0, 2, 3; tuned right at 0, 1, 4 -> fixed 1 and 4, broken 2 and 3
    report = evaluate_run(trained_run, scorer_spec=_Scripted(base_pred, tuned_pred), prompts=prompts,
                          seeds_per_prompt=3, seed_offset=50, num_inference_steps=1, out_dir=tmp_path,
                          save_images=True)
    assert report["fixed"] == 2 and report["broken"] == 2
    assert report["fixed_comparisons"] == [{"prompt": prompts[0], "seed": 51}, {"prompt": prompts[1], "seed": 51}]
    assert report["broken_comparisons"] == [{"prompt": prompts[0], "seed": 52}, {"prompt": prompts[1], "seed": 50}]
    assert report["accuracy_base"] == report["accuracy_tuned"] == 0.5
    summary = format_summary(report)
    assert ("  fixed 2, broken 2 (tuned read as the prompted digit and base not / the reverse)" in summary
            and str(tmp_path / CHANGES_FILE) in summary)
    # eval_grid.png: the unmarked grid of the same images, plus the frames
    names = [[f"{i:03d}_{s}.png" for s in (50, 51, 52)] for i in range(2)]
    rows = {kind: [[Image.open(tmp_path / "eval_samples" / kind / n) for n in row] for row in names]
            for kind in ("base", "tuned")}
    plain = np.asarray(make_grid(prompts, rows["base"], rows["tuned"]))
    with Image.open(report["files"]["grid"]) as grid:
        marked = np.asarray(grid.convert("RGB"))
    _assert_marked(marked, plain, [[None, "fixed", "broken"], ["broken", "fixed", None]])
    # eval_changes.png: fixed (seven 51, one 51), then broken (seven 52, one 50): one row pair each, 6 columns
    assert report["files"]["changes_grid"] == str(tmp_path / CHANGES_FILE)
    with Image.open(tmp_path / CHANGES_FILE) as changes:
        arr = np.asarray(changes.convert("RGB"))
    assert arr.shape[1::-1] == grid_size(4, 6, 96)
    expected = make_grid(
        [f"fixed (2): {prompts[0]}; seed 51", f"fixed (2): {prompts[1]}; seed 51",
         f"broken (2): {prompts[0]}; seed 52", f"broken (2): {prompts[1]}; seed 50"],
        [[rows["base"][0][1]], [rows["base"][1][1]], [rows["base"][0][2]], [rows["base"][1][0]]],
        [[rows["tuned"][0][1]], [rows["tuned"][1][1]], [rows["tuned"][0][2]], [rows["tuned"][1][0]]],
        marks=[["fixed"], ["fixed"], ["broken"], ["broken"]], min_cols=6)
    assert np.array_equal(arr, np.asarray(expected))


def _samples(out: Path, kind: str, report: dict) -> list[np.ndarray]:
    n_prompts = len(report["settings"]["prompts"])
    return [np.asarray(Image.open(out / "eval_samples" / kind / f"{i:03d}_{s}.png"))
            for i in range(n_prompts) for s in report["settings"]["seeds"]]


def test_against_another_adapter_leaves_the_tuned_images_alone(evaluated, trained_run, lora_sd15, tmp_path,
                                                              monkeypatch):
    """With a reference adapter the base side changes, and the reference is gone before the run's adapter comes:
    the tuned images equal those of the evaluation without one, bit for bit."""
    import lora_dpo.evaluation.run as run_module

    plain, plain_out = evaluated
    loaded, real_generate = [], run_module.generate_images

    def generate(pipe, *args, **kwargs):  # the adapters in the pipeline, and the active ones, as each set samples
        loaded.append((sorted({a for names in pipe.get_list_adapters().values() for a in names}),
                       pipe.get_active_adapters()))
        return real_generate(pipe, *args, **kwargs)

    monkeypatch.setattr(run_module, "generate_images", generate)
    report = evaluate_run(trained_run, scorer_spec="jpeg", prompts=PROMPTS, seeds_per_prompt=SEEDS,
                          num_inference_steps=STEPS, out_dir=tmp_path, save_images=True,
                          reference_adapter=lora_sd15)
    assert loaded == [(["reference"], ["reference"]), (["tuned"], ["tuned"])]
    assert report["settings"]["reference_adapter"] == str(lora_sd15)
    assert format_summary(report).splitlines()[0].startswith(f"eval of {trained_run} against {lora_sd15}: ")
    tuned, plain_tuned = _samples(tmp_path, "tuned", report), _samples(plain_out, "tuned", plain)
    assert all(np.array_equal(a, b) for a, b in zip(tuned, plain_tuned))
    base, plain_base = _samples(tmp_path, "base", report), _samples(plain_out, "base", plain)
    assert not any(np.array_equal(a, b) for a, b in zip(base, plain_base))  # the reference was on
    assert report["reward_tuned_mean"] == plain["reward_tuned_mean"]


def test_cli_eval_against_its_own_adapter_ties_everything(trained_run, photo_pairs, tmp_path, capsys):
    code = main(["eval", str(trained_run), "--scorer", "jpeg", "--prompts", "digits", "--seeds-per-prompt", "1",
                 "--steps", "2", "--against", str(trained_run), "--out", str(tmp_path), "--save-images",
                 "--heldout-pairs", str(photo_pairs), "--max-heldout-pairs", "3", "--implicit-draws", "2"])
    assert code == 0
    out = capsys.readouterr().out
    implicit = json.loads((tmp_path / "eval.json").read_text())["implicit_reward"]
    assert implicit["draws"] == 2 and implicit["n_pairs"] == 3
    assert f"{implicit['accuracy']:.3f} ± {implicit['accuracy_se_draws']:.3f} (draws)" in out
    assert out.splitlines()[0].startswith(f"eval of {trained_run} against {trained_run}: ")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["settings"]["reference_adapter"] == str(trained_run)
    base, tuned = _samples(tmp_path, "base", report), _samples(tmp_path, "tuned", report)
    assert len(base) == 10 and all(np.array_equal(a, b) for a, b in zip(base, tuned))
    assert report["identical_images"] == report["ties"] == 10 and report["win_rate"] == 0.5


def test_a_bad_reference_adapter_fails_before_sampling(trained_run, tmp_path, monkeypatch, capsys):
    import lora_dpo.evaluation.run as run_module

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline loaded before the reference adapter was checked")

    monkeypatch.setattr(run_module, "load_pipeline", no_pipeline)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate_run(trained_run, scorer_spec="jpeg", prompts=PROMPTS, seeds_per_prompt=1,
                     reference_adapter=missing, out_dir=tmp_path / "out")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copyfile(trained_run / WEIGHT_NAME, two / name)
    with pytest.raises(ValueError, match="several"):
        evaluate_run(trained_run, scorer_spec="jpeg", prompts=PROMPTS, seeds_per_prompt=1,
                     reference_adapter=two, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "eval.json").exists()
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--scorer", "jpeg", "--against", str(missing),
                 "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_eval_prints_a_summary(trained_run, tmp_path, capsys):
    code = main(["eval", str(trained_run), "--scorer", "jpeg", "--prompts", "digits", "--seeds-per-prompt",
                 "1", "--steps", "1", "--seed-offset", "500", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "win rate" in out and "95% CI" in out and "diversity" in out and str(tmp_path / "eval.json") in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_comparisons"] == 10 and report["settings"]["seeds"] == [500]
    assert report["diversity_ratio"] is None  # one seed per prompt: no pair to measure
    assert main(["eval", str(tmp_path / "missing"), "--scorer", "jpeg"]) == 2
    assert "recipe.yaml" in capsys.readouterr().err


def test_bad_arguments_fail_before_sampling(trained_run):
    with pytest.raises(ValueError, match="seeds_per_prompt"):
        evaluate_run(trained_run, scorer_spec="jpeg", prompts=PROMPTS, seeds_per_prompt=0)
    with pytest.raises(ValueError, match="no prompt"):
        evaluate_run(trained_run, scorer_spec="jpeg", prompts=[], seeds_per_prompt=2)
    with pytest.raises(ValueError, match="unknown scorer"):
        evaluate_run(trained_run, scorer_spec="nope", prompts=PROMPTS, seeds_per_prompt=2)


def test_sdxl_run_evaluates(tiny_sdxl, photo_pairs, tmp_path):
    run = _train("sdxl", tiny_sdxl, photo_pairs, tmp_path / "run", steps=2)
    report = evaluate_run(run, scorer_spec="jpeg", prompts=["a cat"], seeds_per_prompt=2,
                          num_inference_steps=2, heldout_pairs=photo_pairs, max_heldout_pairs=2, implicit_draws=1,
                          out_dir=tmp_path / "eval")
    assert report["family"] == "sdxl" and report["n_comparisons"] == 2
    assert report["identical_images"] < 2 and report["implicit_reward"]["n_pairs"] == 2
    with Image.open(report["files"]["grid"]) as grid:
        assert grid.size == (44 + 2 * 96, 16 + 2 * 96)
