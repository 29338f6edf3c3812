"""CLIP-based scorers: the CLIP score / PickScore (:class:`ClipScorer`) and the LAION aesthetic predictor
(:class:`AestheticScorer`), behind the :class:`lora_dpo.feedback.scorers.Scorer` interface.

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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from lora_dpo.models.lora_files import save_safetensors


def check_lengths(images: list, prompts: list) -> None:
    """Every scorer's first check: one prompt per image. Raises ValueError otherwise."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")


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
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _vision_tower_class():
    """CLIPVisionModelWithProjection that reads the image tower out of a full CLIPModel checkpoint quietly: the
    text tower's keys are expected there and skipped (never loaded)."""
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
        check_lengths(images, prompts)
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
    head = AestheticHead(layers, dropout)
    _load_head_state(head, state_dict, "state_dict")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().float().contiguous() for k, v in head.state_dict().items()},
                     directory / AESTHETIC_WEIGHTS)
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
        check_lengths(images, prompts)
        embeds = torch.nn.functional.normalize(self.embedder.image_embeds(images), dim=-1)
        return self.head(embeds).squeeze(-1).double().cpu().numpy()
