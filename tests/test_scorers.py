"""Captions, the digit-classifier reward (trained on real sklearn digits), the JPEG compressibility reward, and the
CLIP-based rewards (CLIP score / PickScore, LAION aesthetic predictor) on tiny CLIP models built in code."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lora_dpo.feedback.prompts import NUMBER_WORDS, digit_caption, digit_captions, digit_of, load_prompts
from lora_dpo.feedback.scorers import (
    LAION_AESTHETIC_DROPOUT,
    LAION_AESTHETIC_LAYERS,
    AestheticHead,
    AestheticScorer,
    ClipScorer,
    DigitClassifierScorer,
    JpegCompressibilityScorer,
    Scorer,
    digits_to_images,
    images_to_digit_features,
    load_scorer,
    save_aesthetic_predictor,
)

TINY_PROJECTION = 16
TINY_LOGIT_SCALE = 3.0  # exp(3) ≈ 20.1: a scorer that forgets the exp() is off by a factor of 6.7


def _image_processor_class():
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random tiny CLIPModel (16 px images, 4 px patches, 2 layers, projection 16) and its processor (the kit's
    offline byte-level tokenizer, an explicit CLIP image processor), saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from lora_dpo.models.tiny import build_tokenizer, text_config

    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=37,
                              num_attention_heads=4, num_hidden_layers=2)
    text = text_config(len(tokenizer))
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TINY_PROJECTION,
                        logit_scale_init_value=TINY_LOGIT_SCALE)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    image_processor = _image_processor_class()(
        do_resize=True, size={"shortest_edge": 16}, do_center_crop=True, crop_size={"height": 16, "width": 16},
        do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return Path(folder)


def save_tiny_aesthetic(folder: Path, clip: Path | None = None, seed: int = 0, layers=(TINY_PROJECTION, 12, 8, 1),
                        dropout=(0.2, None)) -> Path:
    """A random aesthetic MLP on ``clip`` (default: a tiny CLIP saved in ``folder/clip``, the default layout)."""
    if clip is None:
        save_tiny_clip(Path(folder) / "clip", seed=seed)
    torch.manual_seed(seed + 1)
    head = AestheticHead(layers, dropout)
    for param in head.parameters():  # larger than the default init, so the scores spread
        torch.nn.init.normal_(param, std=0.5)
    return save_aesthetic_predictor(folder, head.state_dict(), layers=layers, dropout=dropout,
                                    clip=str(clip) if clip is not None else "clip")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("scorers") / "clip")


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory) -> Path:
    return save_tiny_aesthetic(tmp_path_factory.mktemp("scorers") / "aesthetic")


def _test_images(n: int = 5) -> list[Image.Image]:
    """Random images of several sizes and modes (RGB, grayscale, RGBA)."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        h, w = 16 + 3 * i, 40 - 4 * i
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        images.append(img.convert(("RGB", "L", "RGBA")[i % 3]))
    return images


def _hand_clip_features(folder: Path, images: list[Image.Image], prompts: list[str] | None = None):
    """Image (and text) features straight from CLIPModel.get_image_features / get_text_features."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = _image_processor_class().from_pretrained(folder)(
        images=[img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image)
        if prompts is None:
            return model, image, None
        tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, truncation=True, max_length=32,
                                                       return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        text = getattr(text, "pooler_output", text)
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels).logits_per_image
    return model, image, (text, logits)


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


# ----------------------------------------------------------------------------------------------------------
# CLIP score / PickScore


def test_clip_score_is_logit_scale_times_cosine(tiny_clip):
    images = _test_images(5)
    prompts = ["a cat", "a dog on the grass", "a cat", "the end of the road", "x"]
    scorer = load_scorer(str(tiny_clip), device="cpu", batch_size=2)
    assert isinstance(scorer, ClipScorer) and scorer.embedder.device.type == "cpu"
    scores = scorer.score(images, prompts)
    assert scores.shape == (5,) and scores.dtype == np.float64

    model, image, (text, logits) = _hand_clip_features(tiny_clip, images, prompts)
    cos = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
    scale = float(model.logit_scale.detach().exp())
    assert scale == pytest.approx(np.exp(TINY_LOGIT_SCALE), rel=1e-6)
    np.testing.assert_allclose(scores, (scale * cos).double().numpy(), rtol=0, atol=1e-5)
    # The same as CLIP's own image-text logits (the diagonal: image i with prompt i).
    np.testing.assert_allclose(scores, logits.diagonal().double().numpy(), rtol=0, atol=1e-5)
    # Batching does not change the scores.
    np.testing.assert_allclose(ClipScorer.from_pretrained(tiny_clip, device="cpu", batch_size=5).score(images, prompts),
                               scores, rtol=0, atol=1e-5)


def test_clip_score_depends_on_the_prompt(tiny_clip):
    scorer = load_scorer(str(tiny_clip), device="cpu")
    image = _test_images(1)[0]
    a, b = scorer.score([image, image], ["a red apple", "a photo of a mountain at night"])
    assert abs(a - b) > 1e-3
    # Captions longer than the text model's 32 positions are truncated (as PickScore does at 77 tokens), not an
    # error: two captions that differ only after the cut score the same.
    long_a, long_b = "w" * 100 + " apple", "w" * 100 + " mountain"
    same = scorer.score([image, image], [long_a, long_b])
    assert same[0] == pytest.approx(same[1], abs=1e-6) and np.isfinite(same).all()
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        scorer.score([image], ["a", "b"])
    assert scorer.score([], []).shape == (0,)


# ----------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor


def test_aesthetic_head_has_laions_layout():
    """The default shape is LAION's improved aesthetic predictor, with its state-dict key names (so its weights,
    converted to safetensors, load unchanged)."""
    head = AestheticHead(LAION_AESTHETIC_LAYERS, LAION_AESTHETIC_DROPOUT)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }
    assert [type(m).__name__ for m in head.layers] == ["Linear", "Dropout"] * 3 + ["Linear"] * 2
    with pytest.raises(ValueError, match="dropout needs 4 entries"):
        AestheticHead(LAION_AESTHETIC_LAYERS, [0.2])


def test_aesthetic_is_the_mlp_on_the_normalised_embedding(tiny_aesthetic):
    from safetensors.torch import load_file

    images = _test_images(4)
    scorer = load_scorer(str(tiny_aesthetic), device="cpu", batch_size=3)
    assert isinstance(scorer, AestheticScorer)
    assert not hasattr(scorer.embedder.model, "text_model")  # only the image tower is loaded
    scores = scorer.score(images, ["a", "b", "c", "d"])
    assert scores.shape == (4,) and scores.dtype == np.float64 and scores.std() > 1e-3

    _, image, _ = _hand_clip_features(tiny_aesthetic / "clip", images)
    x = image / image.norm(dim=-1, keepdim=True)
    weights = load_file(tiny_aesthetic / "aesthetic.safetensors")
    for i in (0, 2, 3):  # Linear(16, 12), Dropout, Linear(12, 8), Linear(8, 1): no activations
        x = x @ weights[f"layers.{i}.weight"].T + weights[f"layers.{i}.bias"]
    assert len(weights) == 6
    np.testing.assert_allclose(scores, x.squeeze(-1).double().numpy(), rtol=0, atol=1e-5)
    # Prompt-independent: other prompts give the very same scores.
    np.testing.assert_array_equal(scorer.score(images, ["x"] * 4), scores)


def test_aesthetic_backbone_by_absolute_path(tiny_clip, tmp_path):
    folder = save_tiny_aesthetic(tmp_path / "aes", clip=tiny_clip)
    assert json.loads((folder / "aesthetic.json").read_text())["clip"] == str(tiny_clip)
    assert sorted(p.name for p in folder.iterdir()) == ["aesthetic.json", "aesthetic.safetensors"]
    scorer = load_scorer(str(folder), device="cpu")
    assert isinstance(scorer, AestheticScorer) and scorer.score(_test_images(2), ["", ""]).shape == (2,)


def test_aesthetic_on_a_vision_only_backbone(tiny_aesthetic, tmp_path):
    """The backbone may be a CLIPVisionModelWithProjection folder: the same image tower gives the same scores."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    full = CLIPConfig.from_pretrained(tiny_aesthetic / "clip")
    vision_config = full.vision_config
    vision_config.projection_dim = full.projection_dim
    tower = CLIPVisionModelWithProjection(vision_config)
    state = CLIPModel.from_pretrained(tiny_aesthetic / "clip").state_dict()
    tower.load_state_dict({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))})
    tower.save_pretrained(tmp_path / "aes" / "clip")
    _image_processor_class().from_pretrained(tiny_aesthetic / "clip").save_pretrained(tmp_path / "aes" / "clip")
    for name in ("aesthetic.json", "aesthetic.safetensors"):
        shutil.copy(tiny_aesthetic / name, tmp_path / "aes" / name)
    assert json.loads((tmp_path / "aes" / "clip" / "config.json").read_text())["model_type"] == "clip_vision_model"
    images = _test_images(3)
    np.testing.assert_allclose(load_scorer(str(tmp_path / "aes"), device="cpu").score(images, [""] * 3),
                               load_scorer(str(tiny_aesthetic), device="cpu").score(images, [""] * 3), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Folders that are not scorers: clear errors, before the weights are read


def _garbage_weights(folder: Path) -> None:
    """Replace the weights with bytes that are no safetensors file: an error about anything else proves that the
    check came before the weights were read."""
    (folder / "model.safetensors").write_bytes(b"not safetensors")


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _not_clip(folder):
    _garbage_weights(folder)
    _edit_json(folder / "config.json", model_type="bert")


def _pickle_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _no_processor(folder):
    _garbage_weights(folder)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)


def _no_tokenizer(folder):
    _garbage_weights(folder)
    for name in ("tokenizer.json", "vocab.json"):
        (folder / name).unlink(missing_ok=True)


def _wrong_shapes(folder):
    _edit_json(folder / "config.json", projection_dim=8)


def _corrupt_weights(folder):
    _garbage_weights(folder)


@pytest.mark.parametrize("breaks, message", [
    (_not_clip, "describes a 'bert' model; a CLIP scorer needs model_type 'clip'"),
    (_pickle_only, "no model.safetensors (weights are only read from safetensors; found pytorch_model.bin"),
    (_no_processor, "has no image processor config"),
    (_no_tokenizer, "has no tokenizer"),
    (_wrong_shapes, "cannot load the CLIP weights"),
    (_corrupt_weights, "cannot load the CLIP weights"),
])
def test_bad_clip_folders(tiny_clip, tmp_path, breaks, message):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_clip, folder)
    breaks(folder)
    with pytest.raises(ValueError) as info:
        load_scorer(str(folder), device="cpu")
    assert message in str(info.value) and str(folder) in str(info.value)


def _aes_format(folder):
    _edit_json(folder / "aesthetic.json", format="something/else")


def _aes_input_size(folder):
    _edit_json(folder / "aesthetic.json", layers=[32, 12, 8, 1])


def _aes_weights_misfit(folder):
    _edit_json(folder / "aesthetic.json", layers=[TINY_PROJECTION, 10, 8, 1])


def _aes_no_backbone(folder):
    shutil.rmtree(folder / "clip")


def _aes_no_weights(folder):
    (folder / "aesthetic.safetensors").unlink()


def _aes_corrupt_weights(folder):
    (folder / "aesthetic.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")


@pytest.mark.parametrize("breaks, error, message", [
    (_aes_format, ValueError, "is not a lora_dpo.aesthetic_mlp/1 config"),
    (_aes_input_size, ValueError, "input size 32 differs from the CLIP projection size 16"),
    (_aes_weights_misfit, ValueError, "does not fit the aesthetic MLP"),
    (_aes_no_backbone, ValueError, "has no config.json"),
    (_aes_no_weights, FileNotFoundError, "aesthetic.safetensors is missing"),
    (_aes_corrupt_weights, ValueError, "cannot read the aesthetic MLP weights"),
])
def test_bad_aesthetic_folders(tiny_aesthetic, tmp_path, breaks, error, message):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_aesthetic, folder)
    _garbage_weights(folder / "clip")  # every one of these is caught before the CLIP weights are read
    breaks(folder)
    with pytest.raises(error, match=re.escape(message)):
        load_scorer(str(folder), device="cpu")


def test_clip_scorers_follow_the_protocol(tiny_clip, tiny_aesthetic):
    for spec in (tiny_clip, tiny_aesthetic):
        scorer = load_scorer(str(spec), device="cpu")
        assert isinstance(scorer, Scorer) and isinstance(scorer.name, str)
    assert load_scorer(str(tiny_clip)).embedder.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
