"""Opening a pretrained diffusers pipeline, whatever its family: its ``model_index.json``, safetensors-only weights,
and the dtype names recipes and commands use.

Below :mod:`lora_dpo.models.families`: a family reads its pipeline through these, and nothing here knows a family.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from lora_dpo.errors import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Recipe precision names (``train.mixed_precision``, ``reference.dtype``, ``model.vae_dtype``) and torch dtype names.
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_hub_id(name: str) -> bool:
    """``name`` has the form ``org/name`` and is not an existing local path."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def read_model_index(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` as a dict, from a local folder or the hub (config file only).

    Raises:
        ModelLoadError: a local path that does not exist or is not a diffusers pipeline folder, a string that is
            neither a folder nor a hub id, or a hub id that cannot be reached (e.g. offline).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"'{name_or_path}' is not a diffusers pipeline folder (no model_index.json). Pass a folder written "
                "by pipe.save_pretrained(...) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
            )
        return json.loads(index.read_text())
    if not HUB_ID.match(name_or_path):
        raise ModelLoadError(
            f"model.pretrained_model_name_or_path='{name_or_path}' is neither an existing folder nor a hub id "
            "of the form org/name."
        )
    try:
        return dict(DiffusionPipeline.load_config(name_or_path, revision=revision))
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise ModelLoadError(
            f"could not read model_index.json of hub id '{name_or_path}' ({type(exc).__name__}: {exc}). "
            "Check the id and your network/HF token, or pass a local pipeline folder."
        ) from exc


def read_component_config(source, subfolder: str = "unet") -> dict[str, Any]:
    """A pipeline component's config as a dict, from a mapping (``unet.config``; None: ``{}``), a ``config.json``,
    a folder holding one, or a pipeline folder (its ``<subfolder>/config.json``).

    Raises:
        FileNotFoundError: no config file at the path.
    """
    if source is None or isinstance(source, Mapping):
        return dict(source or {})
    path = Path(source)
    path = path / subfolder / "config.json" if (path / subfolder).is_dir() else path
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


@contextmanager
def safetensors_only(name: str) -> Iterator[None]:
    """Turn the loaders' "no safetensors file" error (weights loaded with ``use_safetensors=True``) into a
    :class:`ModelLoadError` that says why pickle weights are refused and how to convert them."""
    try:
        yield
    except OSError as exc:
        if "safetensors" not in str(exc) and ".bin" not in str(exc):
            raise
        raise ModelLoadError(
            f"could not load the weights of '{name}' as safetensors ({exc}). lora-dpo never reads pickle weights "
            "(.bin/.ckpt: unpickling can run arbitrary code). Convert the pipeline once in a process you trust: "
            "DiffusionPipeline.from_pretrained(path).save_pretrained(new_path, safe_serialization=True)"
        ) from exc
