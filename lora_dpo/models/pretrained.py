"""Opening a pretrained diffusers pipeline, whatever its family: its ``model_index.json``, safetensors-only weights,
and the dtype names recipes and commands use.

Below :mod:`lora_dpo.models.families`: a family reads its pipeline through these, and nothing here knows a family.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import struct
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError

from lora_dpo.errors import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Seconds the one reachability probe of the hub waits for a connection (:func:`hub_unreachable`).
HUB_PROBE_TIMEOUT = 3.0

# Recipe precision names (``train.mixed_precision``, ``reference.dtype``, ``model.vae_dtype``) and torch dtype names.
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_hub_id(name: str) -> bool:
    """``name`` has the form ``org/name`` and is not an existing local path."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it can: ``HF_HUB_OFFLINE`` (no connection is tried),
    else one TCP connection to the hub's host (or the HTTPS proxy's), waiting at most :data:`HUB_PROBE_TIMEOUT`
    seconds. Asked once per process (``hub_unreachable.cache_clear()`` asks again), so an offline machine answers
    at once instead of after huggingface_hub's retries."""
    if hub_constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    target = urlparse(urllib.request.getproxies().get("https") or hub_constants.ENDPOINT)
    host, port = target.hostname or "huggingface.co", target.port or (80 if target.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as exc:
        return f"no connection to {host}:{port}: {exc}"
    return None


def offline_message(repo_id: str, key: str, kind: str, example: str, repo_type: str = "model") -> str:
    """The one line for hub id ``repo_id`` (the value of recipe key ``key``) when the hub cannot be reached
    (:func:`hub_unreachable`): why, how to pass a local ``kind`` instead (``key=example``), and, unless
    ``HF_HUB_OFFLINE`` is set, that setting it reads a copy from the local hub cache."""
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    if hub_constants.is_offline_mode():
        why, cache = "HF_HUB_OFFLINE is set and it is not in the local hub cache", ""
    else:
        why = f"the Hugging Face hub could not be reached ({hub_unreachable()})"
        cache = " (or set HF_HUB_OFFLINE=1 if it is in the local hub cache)"
    return (f"{key}='{repo_id}' is a hub id, but {why}. Pass a local {kind}: {key}={example}, copied from a "
            f"machine with access (e.g. `hf download {repo_id}{flag} --local-dir DIR`){cache}")


def read_model_index(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` as a dict, from a local folder or the hub (config file only).

    Raises:
        ModelLoadError: a local path that does not exist or is not a diffusers pipeline folder, a string that is
            neither a folder nor a hub id, or a hub id that cannot be read: offline (:func:`hub_unreachable`,
            answered at once; under ``HF_HUB_OFFLINE`` the local hub cache is read), a missing repository or file.
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
            f"model.pretrained_model_name_or_path='{name_or_path}' is neither an existing folder (a relative path "
            f"is read from the current directory, {Path.cwd()}) nor a hub id of the form org/name: set it to "
            "/path/to/pipeline"
        )
    if hub_unreachable():  # at once, instead of after huggingface_hub's retries
        cached = try_to_load_from_cache(name_or_path, "model_index.json", revision=revision)
        if isinstance(cached, str) and hub_constants.is_offline_mode():
            return json.loads(Path(cached).read_text())
        raise ModelLoadError(offline_message(name_or_path, "model.pretrained_model_name_or_path",
                                             "diffusers pipeline folder", "/path/to/pipeline"))
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


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a ``.safetensors`` file, from its header alone, or None when it reads: the header (an
    8-byte little-endian length, then that much JSON) must fit the file, and the tensors' data offsets must cover
    the rest of the file exactly (the safetensors format). Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"its header claims {length} bytes but the file has {size}"
            header = json.loads(fh.read(length))
    except OSError as exc:
        return str(exc)
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    data = size - 8 - length
    if max(ends, default=0) != data:
        return f"its tensors need {max(ends, default=0)} bytes of data, the file holds {data}"
    return None


def corrupt_weights_message(path: str | Path, detail: str) -> str:
    """The message of a weights file that does not read as safetensors although it is one by name and header."""
    return (f"{path} is truncated or corrupt ({detail}): copy or download it again, or save it again from the "
            "process that made it")


def _corrupt_file_in(name: str) -> tuple[str, str] | None:
    """The first ``.safetensors`` file of a local model folder with a :func:`safetensors_problem`, and that."""
    folder = Path(name).expanduser()
    for file in sorted(folder.rglob("*.safetensors")) if folder.is_dir() else ():
        problem = safetensors_problem(file)
        if problem:
            return str(file), problem
    return None


@contextmanager
def safetensors_only(name: str) -> Iterator[None]:
    """Turn the loaders' weight-file errors into a :class:`ModelLoadError` naming the model: "no safetensors file"
    (weights loaded with ``use_safetensors=True``) says why pickle weights are refused and how to convert them; a
    truncated or corrupt ``.safetensors`` file (diffusers' "Unable to load weights", safetensors' own
    ``SafetensorError``) is named as such."""
    try:
        yield
    except SafetensorError as exc:
        file, detail = _corrupt_file_in(name) or (f"a weights file of '{name}'", str(exc))
        raise ModelLoadError(corrupt_weights_message(file, detail)) from exc
    except OSError as exc:
        text = str(exc)
        if "Unable to load weights from checkpoint file" in text and ".safetensors" in text:
            file, detail = _corrupt_file_in(name) or (text.split("'")[1], "unreadable")
            raise ModelLoadError(corrupt_weights_message(file, detail)) from exc
        if "safetensors" not in text and ".bin" not in text:
            raise
        raise ModelLoadError(
            f"could not load the weights of '{name}' as safetensors ({exc}). lora-dpo never reads pickle weights "
            "(.bin/.ckpt: unpickling can run arbitrary code). Convert the pipeline once in a process you trust: "
            "DiffusionPipeline.from_pretrained(path).save_pretrained(new_path, safe_serialization=True)"
        ) from exc
