"""Captions, the digit-classifier reward (trained on real sklearn digits) and the JPEG compressibility reward."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lora_dpo.prompts import NUMBER_WORDS, digit_caption, digit_captions, digit_of, load_prompts
from lora_dpo.scorers import (
    DigitClassifierScorer,
    JpegCompressibilityScorer,
    Scorer,
    digits_to_images,
    images_to_digit_features,
    load_scorer,
)


@pytest.fixture(scope="module")
def trained():
    return DigitClassifierScorer.train(seed=0)


@pytest.fixture(scope="module")
def heldout():
    """The held-out 20% of load_digits, as the classifier's split (stratified, random_state=0)."""
    data = load_digits()
    _, x_te, _, y_te = train_test_split(data.data, data.target, test_size=0.2, stratify=data.target, random_state=0)
    return x_te, y_te


# ----------------------------------------------------------------------------------------------------------
# prompts


def test_captions_round_trip():
    assert digit_caption(7) == "a handwritten digit seven"
    assert [digit_of(c) for c in digit_captions()] == list(range(10))
    assert len(NUMBER_WORDS) == 10 and NUMBER_WORDS[0] == "zero"
    assert digit_of("A Handwritten Digit NINE, nine") == 9  # case-insensitive; the same word twice counts once


@pytest.mark.parametrize("caption, message", [
    ("a handwritten digit", "names no digit"),
    ("none of them", "names no digit"),  # 'one' inside 'none' is not a number word
    ("a seven next to a one", "several digits (one, seven)"),
])
def test_digit_of_errors(caption, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        digit_of(caption)


@pytest.mark.parametrize("bad", [-1, 10, 3.0, True])
def test_digit_caption_rejects(bad):
    with pytest.raises(ValueError):
        digit_caption(bad)


def test_load_prompts(tmp_path):
    assert load_prompts("digits") == digit_captions()
    path = tmp_path / "p.txt"
    path.write_text("# a comment\n a cat \n\nlast\n")
    assert load_prompts(str(path)) == ["a cat", "last"]
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n# only\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(str(tmp_path / "empty.txt"))


# ----------------------------------------------------------------------------------------------------------
# the digits representation


def test_representation_round_trip(heldout):
    """Rendering 8x8 digits as 32x32 RGB (bicubic) and pooling back gives nearly the original values."""
    x_te, _ = heldout
    imgs = digits_to_images(x_te[:50])
    assert imgs[0].size == (32, 32) and imgs[0].mode == "RGB"
    back = images_to_digit_features(imgs)
    assert back.shape == (50, 8, 8) and back.min() >= 0 and back.max() <= 16
    assert np.abs(back - x_te[:50].reshape(-1, 8, 8)).mean() < 1.0  # out of 16
    # Other sizes are resized to 32 px first.
    big = images_to_digit_features(digits_to_images(x_te[:5], size=64))
    assert np.abs(big - back[:5]).mean() < 1.0


# ----------------------------------------------------------------------------------------------------------
# digit classifier


def test_classifier_heldout_accuracy(trained, heldout):
    scorer, report = trained
    assert report["train_size"] == 1437 and report["test_size"] == 360 and report["split_seed"] == 0
    assert report["test_accuracy"] > 0.9
    # The world's path: held-out digits rendered as 32x32 RGB images, classified through predict().
    x_te, y_te = heldout
    acc_rgb = float((scorer.predict(digits_to_images(x_te)) == y_te).mean())
    assert acc_rgb > 0.9
    assert acc_rgb == pytest.approx(report["test_accuracy_rgb32"])


def test_classifier_reward_prefers_true_caption(trained, heldout):
    scorer, _ = trained
    x_te, y_te = heldout
    imgs = digits_to_images(x_te[:100])
    probs = scorer.probabilities(imgs)
    assert probs.shape == (100, 10) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    true = scorer.score(imgs, [digit_caption(int(y)) for y in y_te[:100]])
    wrong = scorer.score(imgs, [digit_caption(int(y + 1) % 10) for y in y_te[:100]])
    assert true.shape == (100,) and true.dtype == np.float64
    assert (true > wrong).mean() > 0.9
    assert scorer.predict(imgs).dtype.kind == "i"


def test_classifier_score_errors(trained):
    scorer, _ = trained
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="names no digit"):
        scorer.score([img], ["a cat"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        scorer.score([img], [digit_caption(1), digit_caption(2)])


def test_save_and_load_round_trip(trained, heldout, tmp_path):
    scorer, report = trained
    scorer.save(tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["classifier.json", "classifier.safetensors"]
    config = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert config["test_accuracy"] == report["test_accuracy"] and config["split_seed"] == 0
    assert config["architecture"]["type"] == "cnn" and "input_format" in config
    imgs = digits_to_images(heldout[0][:20])
    for loaded in (DigitClassifierScorer.from_pretrained(tmp_path / "clf"), load_scorer(str(tmp_path / "clf"))):
        assert isinstance(loaded, DigitClassifierScorer)
        np.testing.assert_array_equal(loaded.probabilities(imgs), scorer.probabilities(imgs))


def test_train_is_deterministic(trained):
    """Same seed, same classifier (a retrain on one thread is ~4 s)."""
    _, report = trained
    _, again = DigitClassifierScorer.train(seed=0)
    assert again == report


# ----------------------------------------------------------------------------------------------------------
# JPEG compressibility, the loader, the protocol


def test_jpeg_prefers_flat_image():
    rng = np.random.default_rng(0)
    flat = Image.new("RGB", (32, 32), (128, 128, 128))
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    scorer = JpegCompressibilityScorer()
    scores = scorer.score([flat, noise], ["x", "y"])
    assert scores.shape == (2,) and scores.dtype == np.float64
    assert scores[0] > scores[1] and (scores < 0).all()
    assert scorer.score([noise], ["anything else"])[0] == scores[1]  # prompts are ignored
    with pytest.raises(ValueError):
        scorer.score([flat], [])


def test_load_scorer(tmp_path):
    assert isinstance(load_scorer("jpeg"), JpegCompressibilityScorer)
    with pytest.raises(ValueError, match="'jpeg'.*classifier.json"):
        load_scorer("pickscore")
    with pytest.raises(ValueError, match="classifier.json"):
        load_scorer(str(tmp_path))  # a folder without classifier.json


def test_scorers_follow_the_protocol(trained):
    for scorer in (trained[0], JpegCompressibilityScorer()):
        assert isinstance(scorer, Scorer) and isinstance(scorer.name, str)
