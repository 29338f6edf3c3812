"""Reward models ("scorers") that rank images: one interface, so real scorers plug in.

A scorer maps N images and their N prompts to N float64 rewards, higher = better. Built in:

- :class:`DigitClassifierScorer`: the probability, under a small CNN trained on REAL handwritten digits
  (scikit-learn's ``load_digits``), that the image shows the digit named in its prompt.
- :class:`JpegCompressibilityScorer`: minus the JPEG size in kB, the compressibility reward of DDPO (Black et al.
  2023, "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301).
- :class:`ClipScorer`: ``exp(logit_scale) · cos(image embedding, text embedding)`` of a CLIP model. With the
  PickScore weights (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569: a CLIP-H fine-tuned on Pick-a-Pic) this
  is PickScore; with a plain CLIP it is the CLIP score. Prompt-dependent.
- :class:`AestheticScorer`: the LAION "improved aesthetic predictor", an MLP on the L2-normalised CLIP image
  embedding. Prompt-independent.

The CLIP scorers and their folder layouts are in :mod:`lora_dpo.feedback.clip_scorers` (re-exported here).

:func:`load_scorer` builds one from a string spec (command line, configs).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lora_dpo.feedback.clip_scorers import (  # noqa: F401  (re-exported: the scorers' public names live here)
    AESTHETIC_CONFIG,
    AESTHETIC_WEIGHTS,
    LAION_AESTHETIC_DROPOUT,
    LAION_AESTHETIC_LAYERS,
    AestheticHead,
    AestheticScorer,
    ClipEmbedder,
    ClipScorer,
    check_lengths,
    default_device,
    save_aesthetic_predictor,
)
from lora_dpo.feedback.prompts import digit_of
from lora_dpo.models.lora_files import save_safetensors

CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG = "classifier.safetensors", "classifier.json"
_FORMAT = "lora_dpo.digit_classifier/1"
_INPUT_FORMAT = ("grayscale -> 32x32 (bicubic, unless already 32x32) -> mean of 4x4 blocks -> 8x8 scaled to "
                 "0..16 (sklearn load_digits representation); the network sees it divided by 16")


@runtime_checkable
class Scorer(Protocol):
    """``score(images, prompts) -> (N,) float64``, higher = better; ``name`` identifies the reward."""

    name: str

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------------------
# The digits representation


def images_to_digit_features(images: list[Image.Image]) -> np.ndarray:
    """Images -> ``(N, 8, 8)`` float32 in 0..16, the representation of ``sklearn.datasets.load_digits``.

    Each image is converted to grayscale (white ink on black, as in the digits world), resized to 32x32 (bicubic;
    skipped when already 32x32), and each 4x4 block is averaged and scaled from 0..255 to 0..16: sklearn's digits
    are 32x32 bitmaps whose on-pixels are counted in 4x4 blocks.
    """
    out = np.empty((len(images), 8, 8), dtype=np.float32)
    for i, img in enumerate(images):
        gray = img.convert("L")
        if gray.size != (32, 32):
            gray = gray.resize((32, 32), Image.Resampling.BICUBIC)
        arr = np.asarray(gray, dtype=np.float32).reshape(8, 4, 8, 4).mean(axis=(1, 3))
        out[i] = arr * (16.0 / 255.0)
    return out


def digits_to_images(digits: np.ndarray, size: int = 32) -> list[Image.Image]:
    """sklearn digits ``(N, 64)`` or ``(N, 8, 8)`` in 0..16 -> N RGB PIL images of ``size`` px, the way the digits
    world renders them: scaled to 0..255 (uint8), bicubic upscale, gray replicated to RGB (white ink on black)."""
    arr = np.asarray(digits, dtype=np.float64).reshape(-1, 8, 8)
    gray = np.clip(np.round(arr * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return [Image.fromarray(g, "L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB") for g in gray]


# ----------------------------------------------------------------------------------------------------------
# Digit classifier


def _build_net(channels: tuple[int, int] = (16, 32), hidden: int = 64) -> torch.nn.Module:
    """Input ``(N, 1, 8, 8)`` in 0..1 -> logits ``(N, 10)``."""
    c1, c2 = channels
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


class DigitClassifierScorer:
    """Reward = probability (softmax of a CNN trained with cross-entropy) of the digit named in the prompt.

    Inputs are any-size PIL images; see :func:`images_to_digit_features` for the representation. Prompts must
    name exactly one digit by its number word (:func:`lora_dpo.feedback.prompts.digit_of`).
    """

    name = "digit_classifier"

    def __init__(self, net: torch.nn.Module, config: dict[str, Any]) -> None:
        self.net = net.eval()
        self.config = config

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """``(N, 10)`` float64 class probabilities (rows sum to 1)."""
        if not images:
            return np.zeros((0, 10))
        x = torch.from_numpy(images_to_digit_features(images) / 16.0).unsqueeze(1)
        return torch.softmax(self.net(x).double(), dim=1).numpy()

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """``(N,)`` int64 most probable digit of each image."""
        return self.probabilities(images).argmax(axis=1)

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """``(N,)`` float64 in [0, 1]: probability of ``digit_of(prompts[i])`` for image i.

        Raises:
            ValueError: lengths differ, or a prompt names no digit / several digits.
        """
        check_lengths(images, prompts)
        targets = np.array([digit_of(p) for p in prompts], dtype=np.int64)
        return self.probabilities(images)[np.arange(len(targets)), targets]

    @classmethod
    def train(cls, seed: int = 0, *, split_seed: int = 0, epochs: int = 40, lr: float = 3e-3,
              weight_decay: float = 1e-4, batch_size: int = 64) -> tuple[DigitClassifierScorer, dict[str, Any]]:
        """Train on a stratified 80% split of ``sklearn.datasets.load_digits`` (``train_test_split`` with
        ``random_state=split_seed``); evaluate on the other 20%. AdamW, cross-entropy, a few seconds on a CPU.

        Returns:
            (scorer, report) with ``train_size``, ``test_size``, ``test_accuracy`` and ``test_nll`` (held-out
            8x8 digits as given), ``test_accuracy_rgb32`` (held-out digits first rendered as 32x32 RGB images with
            :func:`digits_to_images`, then classified through :meth:`predict`), ``seed``, ``split_seed``.
        """
        data = load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=0.2, stratify=data.target,
                                                  random_state=split_seed)
        arch = {"type": "cnn", "channels": [16, 32], "hidden": 64}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = _build_net(tuple(arch["channels"]), arch["hidden"])
            xt = torch.tensor(x_tr / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
            yt = torch.tensor(y_tr, dtype=torch.int64)
            opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
            for _ in range(epochs):
                for idx in torch.randperm(len(xt)).split(batch_size):
                    loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        scorer = cls(net, {})
        probs = scorer._probabilities_8x8(x_te)
        report = {
            "train_size": len(y_tr), "test_size": len(y_te), "seed": seed, "split_seed": split_seed,
            "test_accuracy": float((probs.argmax(1) == y_te).mean()),
            "test_nll": float(-np.log(probs[np.arange(len(y_te)), y_te] + 1e-12).mean()),
            "test_accuracy_rgb32": float((scorer.predict(digits_to_images(x_te)) == y_te).mean()),
        }
        scorer.config = {"format": _FORMAT, "architecture": arch, "input_format": _INPUT_FORMAT,
                         "training": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                                      "batch_size": batch_size, "data": "sklearn.datasets.load_digits"},
                         **report}
        return scorer, report

    @torch.no_grad()
    def _probabilities_8x8(self, digits: np.ndarray) -> np.ndarray:
        x = torch.tensor(np.asarray(digits) / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return torch.softmax(self.net(x).double(), dim=1).numpy()

    def save(self, directory: str | Path) -> Path:
        """Write ``classifier.safetensors`` (weights) and ``classifier.json`` (architecture, input format,
        held-out accuracy, split seed) into ``directory`` (created). No pickle. Returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.contiguous() for k, v in self.net.state_dict().items()}, directory / CLASSIFIER_WEIGHTS)
        (directory / CLASSIFIER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DigitClassifierScorer:
        """Load what :meth:`save` wrote.

        Raises:
            FileNotFoundError: a file is missing. ValueError: ``classifier.json`` is not this format.
        """
        directory = Path(directory)
        config = json.loads((directory / CLASSIFIER_CONFIG).read_text())
        arch = config.get("architecture", {})
        if config.get("format") != _FORMAT or arch.get("type") != "cnn":
            raise ValueError(f"{directory / CLASSIFIER_CONFIG} is not a {_FORMAT} classifier config")
        net = _build_net(tuple(arch["channels"]), arch["hidden"])
        net.load_state_dict(load_file(directory / CLASSIFIER_WEIGHTS))
        return cls(net, config)


# ----------------------------------------------------------------------------------------------------------
# JPEG compressibility and the loader


class JpegCompressibilityScorer:
    """Reward = -(JPEG size in kB, 1 kB = 1000 bytes) of the image saved as RGB JPEG at ``quality`` (95): the
    compressibility reward of DDPO (Black et al. 2023, arXiv 2305.13301). Prompts are ignored."""

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95) -> None:
        self.quality = quality

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """``(N,)`` float64, negative kB. Raises ValueError when the lengths differ."""
        check_lengths(images, prompts)
        sizes = []
        for img in images:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -np.asarray(sizes, dtype=np.float64)




# ----------------------------------------------------------------------------------------------------------
# The loader


def load_scorer(spec: str, *, device: str | torch.device | None = None, batch_size: int = 32) -> Scorer:
    """Build a scorer from a spec:

    - ``"jpeg"`` -> :class:`JpegCompressibilityScorer`;
    - a folder holding ``classifier.json`` -> :meth:`DigitClassifierScorer.from_pretrained`;
    - a folder holding ``aesthetic.json`` -> :meth:`AestheticScorer.from_pretrained`;
    - a folder whose ``config.json`` has ``model_type: clip`` -> :meth:`ClipScorer.from_pretrained` (PickScore).

    ``device`` (default: cuda when available) and ``batch_size`` (images per forward pass) apply to the CLIP
    scorers.

    Raises:
        FileNotFoundError: a path (``a/b``) to no folder.
        ValueError: any other spec (the message lists the options), or a folder of a known kind that cannot be
            used (checked before loading weights where possible; the message says what is wrong).
    """
    if spec == "jpeg":
        return JpegCompressibilityScorer()
    folder = Path(spec)
    if not folder.exists() and len(folder.parts) > 1:  # a path (a bare word gets the list of options below)
        raise FileNotFoundError(f"scorer {spec!r} not found: give 'jpeg' or an existing scorer folder (digit "
                                f"classifier, aesthetic predictor or CLIP / PickScore)")
    if (folder / CLASSIFIER_CONFIG).is_file():
        return DigitClassifierScorer.from_pretrained(folder)
    if (folder / AESTHETIC_CONFIG).is_file():
        return AestheticScorer.from_pretrained(folder, device=device, batch_size=batch_size)
    if (folder / "config.json").is_file():
        return ClipScorer.from_pretrained(folder, device=device, batch_size=batch_size)
    raise ValueError(f"unknown scorer {spec!r}; expected 'jpeg' (JPEG compressibility) or a folder containing "
                     f"{CLASSIFIER_CONFIG} (digit classifier, see DigitClassifierScorer.save), {AESTHETIC_CONFIG} "
                     f"(LAION aesthetic predictor) or a CLIP config.json (CLIP score / PickScore)")
