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

The CLIP scorers compute in fp32, in batches of ``batch_size`` images, on ``device`` (default: cuda when
available). Folder layouts (weights are only ever read from safetensors, never from pickle files):

CLIP / PickScore folder (``load_scorer(FOLDER)`` when ``FOLDER/config.json`` has ``model_type: clip``)::

    FOLDER/config.json                  CLIPModel.save_pretrained(FOLDER)
    FOLDER/model.safetensors            (or model.safetensors.index.json + shards)
    FOLDER/processor_config.json        CLIPProcessor.save_pretrained(FOLDER): the image processor
        (or preprocessor_config.json)   (resize / crop / normalise) and the tokenizer files
    FOLDER/tokenizer.json ...           (tokenizer.json, or vocab.json + merges.txt)

    PickScore: CLIPModel "yuvalkirstain/PickScore_v1" with the processor of "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    both saved into one folder.

Aesthetic folder (``load_scorer(FOLDER)`` when ``FOLDER/aesthetic.json`` exists)::

    FOLDER/aesthetic.json           {"format": "lora_dpo.aesthetic_mlp/1", "layers": [768, 1024, 128, 64, 16, 1],
                                     "dropout": [0.2, 0.2, 0.1, null], "clip": "clip"}
    FOLDER/aesthetic.safetensors    the MLP, LAION's key names: layers.0.weight/bias, layers.2..., layers.4...,
                                    layers.6..., layers.7... (Sequential indices; Dropout modules hold no weights)
    FOLDER/clip/                    the CLIP image tower: a CLIP folder as above (only the image processor is
                                    needed, no tokenizer), or a CLIPVisionModelWithProjection folder

``layers`` are the sizes of the Linear layers' inputs and the last output (the input size must equal the CLIP
projection size); ``dropout`` has one entry per gap between two Linear layers: a Dropout(p) module there, or none
for ``null`` (inactive at inference; it only fixes the Sequential indices, hence the key names). LAION's model has
no activation functions between its Linear layers, and neither has this one. ``clip`` is the backbone folder,
relative to FOLDER or absolute (default ``clip``). :func:`save_aesthetic_predictor` writes the JSON and weights, e.g.
from LAION's ``sac+logos+ava1-l14-linearMSE.pth`` loaded once with ``torch.load`` (the backbone is OpenAI's
CLIP ViT-L/14, "openai/clip-vit-large-patch14").

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

from lora_dpo.prompts import digit_of

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
    name exactly one digit by its number word (:func:`lora_dpo.prompts.digit_of`).
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
        _check_lengths(images, prompts)
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
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

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
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, directory / CLASSIFIER_WEIGHTS)
        (directory / CLASSIFIER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DigitClassifierScorer:
        """Load what :meth:`save` wrote.

        Raises:
            FileNotFoundError: a file is missing. ValueError: ``classifier.json`` is not this format.
        """
        from safetensors.torch import load_file

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
        _check_lengths(images, prompts)
        sizes = []
        for img in images:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -np.asarray(sizes, dtype=np.float64)


def _check_lengths(images: list, prompts: list) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")


# ----------------------------------------------------------------------------------------------------------
# CLIP-based scorers: CLIP score / PickScore, LAION aesthetic predictor

AESTHETIC_CONFIG, AESTHETIC_WEIGHTS = "aesthetic.json", "aesthetic.safetensors"
_AESTHETIC_FORMAT = "lora_dpo.aesthetic_mlp/1"
# The LAION "improved aesthetic predictor" (github.com/christophschuhmann/improved-aesthetic-predictor) on CLIP ViT-L/14.
LAION_AESTHETIC_LAYERS = (768, 1024, 128, 64, 16, 1)
LAION_AESTHETIC_DROPOUT = (0.2, 0.2, 0.1, None)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _clip_folder_config(folder: Path, *, text: bool) -> dict[str, Any]:
    """Check a CLIP folder WITHOUT loading weights; return its ``config.json``.

    Raises:
        ValueError: no config.json, not a CLIP model (``model_type`` ``clip``; also ``clip_vision_model`` when
            ``text`` is False), no safetensors weights, no image processor config, or (``text``) no tokenizer.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} is not a CLIP model folder: it has no config.json (CLIPModel.save_pretrained)")
    config = json.loads(config_file.read_text())
    allowed = ("clip",) if text else ("clip", "clip_vision_model")
    if config.get("model_type") not in allowed:
        raise ValueError(f"{config_file} describes a {config.get('model_type')!r} model; a CLIP scorer needs "
                         f"model_type {' or '.join(map(repr, allowed))}")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        pickled = [p.name for p in folder.glob("*.bin")]
        raise ValueError(
            f"{folder} has no model.safetensors (weights are only read from safetensors"
            + (f"; found {', '.join(pickled)}: load it once with CLIPModel.from_pretrained and save_pretrained it"
               if pickled else "") + ")")
    if not any((folder / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
        raise ValueError(f"{folder} has no image processor config ({' or '.join(_IMAGE_PROCESSOR_FILES)}): save the "
                         f"model's CLIPProcessor (or CLIPImageProcessor) into the folder with save_pretrained")
    if text and not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise ValueError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt): save the model's "
                         f"CLIPProcessor (or its tokenizer) into the folder with save_pretrained")
    return config


def _image_processor_class():
    # The PIL backend: the preprocessing of the original CLIP code (PIL bicubic resize, center crop, normalise),
    # the same numbers whether or not torchvision is installed (transformers 5 picks a torchvision backend when it
    # is). transformers < 5 has only this one, under the name CLIPImageProcessor.
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _vision_tower_class():
    """CLIPVisionModelWithProjection that reads the image tower out of a full CLIPModel checkpoint quietly: the
    text tower's keys are expected there and skipped (never loaded)."""
    from transformers import CLIPVisionModelWithProjection

    class ClipVisionTower(CLIPVisionModelWithProjection):
        _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]

    return ClipVisionTower


class ClipEmbedder:
    """CLIP image (and, with a full CLIPModel, text) embeddings: fp32, in batches, on one device.

    ``model`` is a ``CLIPModel`` or a ``CLIPVisionModelWithProjection`` (both have ``vision_model`` and
    ``visual_projection``, which is exactly what ``get_image_features`` uses); ``tokenizer`` is needed for text.
    Embeddings are the projected, NOT normalised features, ``(N, projection_dim)`` float32 on ``device``.
    """

    def __init__(self, model: torch.nn.Module, image_processor: Any, tokenizer: Any = None, *,
                 device: str | torch.device | None = None, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or default_device())
        self.model = model.to(device=self.device, dtype=torch.float32).eval()
        self.image_processor, self.tokenizer, self.batch_size = image_processor, tokenizer, batch_size
        self.dim = int(model.visual_projection.out_features)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, text: bool = True, device: str | torch.device | None = None,
                        batch_size: int = 32) -> ClipEmbedder:
        """Load a CLIP folder (see the module docstring); ``text=False`` loads the image tower only.

        Raises:
            ValueError: the folder is not a usable CLIP folder (checked before any weight is read), or its weights
                do not fit its config (missing or mis-shaped tensors).
        """
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPVisionConfig

        folder = Path(folder)
        config = _clip_folder_config(folder, text=text)
        try:
            image_processor = _image_processor_class().from_pretrained(str(folder))
            tokenizer = AutoTokenizer.from_pretrained(str(folder)) if text else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder}: cannot load the CLIP processor ({exc})") from exc
        if text:
            model_cls, kwargs = CLIPModel, {}
        else:
            if config["model_type"] == "clip":  # the image tower of a full CLIP; its projection size is top-level
                full = CLIPConfig.from_pretrained(str(folder))
                vision_config = full.vision_config
                vision_config.projection_dim = full.projection_dim
            else:
                vision_config = CLIPVisionConfig.from_pretrained(str(folder))
            model_cls, kwargs = _vision_tower_class(), {"config": vision_config}
        try:
            model, info = model_cls.from_pretrained(str(folder), use_safetensors=True, output_loading_info=True,
                                                    **kwargs)
        except Exception as exc:  # a corrupt or mis-shaped file: name the folder (safetensors, torch, OS errors)
            raise ValueError(f"{folder}: cannot load the CLIP weights ({type(exc).__name__}: {exc})") from exc
        bad = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
        if bad:
            raise ValueError(f"{folder}: the weights do not fit the config (missing or mis-shaped: "
                             f"{', '.join(sorted(bad)[:5])}{' ...' if len(bad) > 5 else ''})")
        return cls(model, image_processor, tokenizer, device=device, batch_size=batch_size)

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """``(N, dim)`` float32 on ``device``; images of any mode are converted to RGB first."""
        out = [torch.zeros(0, self.dim, device=self.device)]
        for start in range(0, len(images), self.batch_size):
            chunk = [img if img.mode == "RGB" else img.convert("RGB") for img in images[start:start + self.batch_size]]
            pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, torch.float32)).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """``(N, dim)`` float32 on ``device``. Captions longer than the model's positions are truncated (CLIP:
        77 tokens), as PickScore does."""
        if self.tokenizer is None or not hasattr(self.model, "text_model"):
            raise ValueError("this CLIP embedder was loaded without its text tower (text=False)")
        max_length = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        out = [torch.zeros(0, self.dim, device=self.device)]
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size]), padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled).float())
        return torch.cat(out)


class ClipScorer:
    """Reward = ``exp(logit_scale) · cos(image embedding, text embedding)``, CLIP's own image-text logit.

    This is PickScore (Kirstain et al. 2023, arXiv 2305.01569) when the folder holds the PickScore weights, and the
    CLIP score otherwise. Each distinct prompt of a call is embedded once.
    """

    name = "clip_score"

    def __init__(self, embedder: ClipEmbedder, source: str = "") -> None:
        if not hasattr(embedder.model, "logit_scale") or embedder.tokenizer is None:
            raise ValueError("ClipScorer needs a full CLIPModel with its tokenizer")
        self.embedder, self.source = embedder, source

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device | None = None,
                        batch_size: int = 32) -> ClipScorer:
        """Load a CLIP / PickScore folder (module docstring). Raises ValueError when it is not one."""
        return cls(ClipEmbedder.from_pretrained(folder, text=True, device=device, batch_size=batch_size), str(folder))

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """``(N,)`` float64 (computed in fp32). Raises ValueError when the lengths differ."""
        _check_lengths(images, prompts)
        index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        text = torch.nn.functional.normalize(self.embedder.text_embeds(list(index)), dim=-1)
        text = text[torch.tensor([index[p] for p in prompts], dtype=torch.long, device=text.device)]
        image = torch.nn.functional.normalize(self.embedder.image_embeds(images), dim=-1)
        scale = self.embedder.model.logit_scale.detach().float().exp()
        return (scale * (image * text).sum(-1)).double().cpu().numpy()


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic MLP: ``self.layers`` = Linear / Dropout modules, no activations (as LAION's model).

    ``layers``: sizes (input, hidden..., output); ``dropout``: one entry per gap between two Linear layers,
    a probability (a Dropout module there) or None (no module). LAION's: :data:`LAION_AESTHETIC_LAYERS`,
    :data:`LAION_AESTHETIC_DROPOUT`.
    """

    def __init__(self, layers: list[int] | tuple[int, ...], dropout: list[float | None] | tuple[float | None, ...]):
        super().__init__()
        layers, dropout = [int(n) for n in layers], list(dropout)
        if len(layers) < 2 or min(layers) < 1:
            raise ValueError(f"aesthetic layers must be >= 2 positive sizes, got {layers}")
        if len(dropout) != len(layers) - 2:
            raise ValueError(f"aesthetic dropout needs {len(layers) - 2} entries (one per gap between Linear layers, "
                             f"null for none), got {dropout}")
        modules: list[torch.nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(layers[:-1], layers[1:])):
            modules.append(torch.nn.Linear(n_in, n_out))
            if i < len(dropout) and dropout[i] is not None:
                modules.append(torch.nn.Dropout(float(dropout[i])))
        self.layers = torch.nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def save_aesthetic_predictor(directory: str | Path, state_dict: dict[str, torch.Tensor], *,
                             layers=LAION_AESTHETIC_LAYERS, dropout=LAION_AESTHETIC_DROPOUT, clip: str = "clip",
                             **extra: Any) -> Path:
    """Write ``aesthetic.json`` and ``aesthetic.safetensors`` into ``directory`` (created); the CLIP backbone
    folder ``clip`` (relative to ``directory`` or absolute) is the caller's to provide. ``state_dict`` must fit
    :class:`AestheticHead` ``(layers, dropout)`` exactly (LAION's file does, with the defaults); ``extra`` goes into
    the JSON (e.g. ``source=...``). Returns the directory.

    Raises:
        ValueError: bad layers / dropout, or a state dict that does not fit them.
    """
    from safetensors.torch import save_file

    head = AestheticHead(layers, dropout)
    _load_head_state(head, state_dict, "state_dict")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in head.state_dict().items()}, directory / AESTHETIC_WEIGHTS)
    config = {"format": _AESTHETIC_FORMAT, "layers": [int(n) for n in layers], "dropout": list(dropout), "clip": clip,
              "input": "L2-normalised CLIP image embedding (projected)", **extra}
    (directory / AESTHETIC_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _load_head_state(head: AestheticHead, state_dict: dict[str, torch.Tensor], where: str) -> None:
    try:
        head.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        raise ValueError(f"{where} does not fit the aesthetic MLP (expected tensors {expected}): {exc}") from exc


class AestheticScorer:
    """Reward = the LAION aesthetic predictor: :class:`AestheticHead` on the L2-normalised CLIP image embedding
    (about 1..10 with LAION's weights). Prompts are ignored."""

    name = "laion_aesthetic"

    def __init__(self, head: AestheticHead, embedder: ClipEmbedder, config: dict[str, Any] | None = None) -> None:
        self.embedder, self.config = embedder, config or {}
        self.head = head.to(device=embedder.device, dtype=torch.float32).eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None,
                        batch_size: int = 32) -> AestheticScorer:
        """Load an aesthetic folder (module docstring). Every check (format, sizes, the backbone folder and its
        projection size) runs before any weight is read.

        Raises:
            ValueError: not this format, inconsistent sizes, bad backbone folder, weights that do not fit.
            FileNotFoundError: ``aesthetic.safetensors`` is missing.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / AESTHETIC_CONFIG).read_text())
        if config.get("format") != _AESTHETIC_FORMAT:
            raise ValueError(f"{directory / AESTHETIC_CONFIG} is not a {_AESTHETIC_FORMAT} config "
                             f"(format {config.get('format')!r})")
        head = AestheticHead(config.get("layers", []), config.get("dropout", []))
        if int(config["layers"][-1]) != 1:
            raise ValueError(f"{directory / AESTHETIC_CONFIG}: the last layer size must be 1 (one score)")
        clip_dir = Path(config.get("clip", "clip"))
        clip_dir = clip_dir if clip_dir.is_absolute() else directory / clip_dir
        clip_config = _clip_folder_config(clip_dir, text=False)
        projection = clip_config.get("projection_dim")
        if projection is not None and int(projection) != int(config["layers"][0]):
            raise ValueError(f"{directory / AESTHETIC_CONFIG}: input size {config['layers'][0]} differs from the CLIP "
                             f"projection size {projection} of {clip_dir}")
        weights = directory / AESTHETIC_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing (the aesthetic MLP weights, safetensors)")
        try:
            state = load_file(weights)
        except Exception as exc:  # not a safetensors file
            raise ValueError(f"{weights}: cannot read the aesthetic MLP weights ({type(exc).__name__}: {exc})") from exc
        _load_head_state(head, state, str(weights))
        embedder = ClipEmbedder.from_pretrained(clip_dir, text=False, device=device, batch_size=batch_size)
        if embedder.dim != int(config["layers"][0]):
            raise ValueError(f"{clip_dir}: CLIP projection size {embedder.dim} != aesthetic input size "
                             f"{config['layers'][0]}")
        return cls(head, embedder, config)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """``(N,)`` float64 (computed in fp32). Raises ValueError when the lengths differ."""
        _check_lengths(images, prompts)
        embeds = torch.nn.functional.normalize(self.embedder.image_embeds(images), dim=-1)
        return self.head(embeds).squeeze(-1).double().cpu().numpy()


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
        ValueError: any other spec (the message lists the options), or a folder of a known kind that cannot be
            used (checked before loading weights where possible; the message says what is wrong).
    """
    if spec == "jpeg":
        return JpegCompressibilityScorer()
    folder = Path(spec)
    if (folder / CLASSIFIER_CONFIG).is_file():
        return DigitClassifierScorer.from_pretrained(folder)
    if (folder / AESTHETIC_CONFIG).is_file():
        return AestheticScorer.from_pretrained(folder, device=device, batch_size=batch_size)
    if (folder / "config.json").is_file():
        return ClipScorer.from_pretrained(folder, device=device, batch_size=batch_size)
    raise ValueError(f"unknown scorer {spec!r}; expected 'jpeg' (JPEG compressibility) or a folder containing "
                     f"{CLASSIFIER_CONFIG} (digit classifier, see DigitClassifierScorer.save), {AESTHETIC_CONFIG} "
                     f"(LAION aesthetic predictor) or a CLIP config.json (CLIP score / PickScore)")
