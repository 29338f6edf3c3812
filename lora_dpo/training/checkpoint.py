"""Resumable training state: written atomically, kept with retention, restored exactly.

A checkpoint ``<run>/checkpoints/step_N/`` holds everything needed to continue bit-for-bit: the trainable
weights (``trainable_weights.safetensors``), optimizer and LR-scheduler state (``optimizer.pt``,
``scheduler.pt``, plus ``scaler.pt`` under fp16), the global RNG states (``rng_state.safetensors`` + ``.json``:
torch, CUDA, numpy, python; the training draws need none, they are keyed by pair: :mod:`lora_dpo.data.draws`), the position in the data (``trainer_state.json``) and the resolved
``recipe.yaml``. It is written to a temporary folder and renamed into place, then ``checkpoints/latest`` is
replaced atomically, so a crash mid-write never leaves a half checkpoint that resume would pick up.
The exported adapter (``pytorch_lora_weights.safetensors`` in the run folder) is a different, small artifact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
SHARDED_STATE = "accelerate_state"  # FSDP / DeepSpeed: Accelerator.save_state, every process its shard


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and _step_of(p) >= 0]
    return sorted((p for p in found if (p / "trainer_state.json").is_file()), key=_step_of)


def resolve_resume(resume_from: str, run_dir: str | Path) -> Path:
    """``latest`` -> the newest checkpoint of ``run_dir``; otherwise the given folder.

    Raises:
        FileNotFoundError: nothing to resume from (the message lists what exists).
    """
    if resume_from == LATEST:
        pointer = Path(run_dir) / CHECKPOINTS / LATEST
        if pointer.is_file():
            target = Path(run_dir) / CHECKPOINTS / pointer.read_text().strip()
            if (target / "trainer_state.json").is_file():
                return target
        found = list_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(
                f"train.resume_from=latest: no checkpoint in {Path(run_dir) / CHECKPOINTS}; start without "
                "train.resume_from, or point output.dir at the run to continue"
            )
        return found[-1]
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"train.resume_from={resume_from} is not a checkpoint folder (no trainer_state.json)")
    return path


def _save_rng(folder: Path) -> None:
    """RNG states without pickle: tensors in ``rng_state.safetensors``, the rest in ``rng_state.json``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    save_file(tensors, folder / "rng_state.safetensors")
    py_version, py_state, py_gauss = random.getstate()
    extra = {"numpy": [kind, pos, has_gauss, cached], "python": [py_version, list(py_state), py_gauss]}
    (folder / "rng_state.json").write_text(json.dumps(extra))


def _load_rng(folder: Path) -> None:
    tensors = load_file(folder / "rng_state.safetensors")
    extra = json.loads((folder / "rng_state.json").read_text())
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, cached = extra["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py_version, py_state, py_gauss = extra["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def staging_folder(run_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place (the same path on every process)."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-step_{step}"


def save_checkpoint(
    run_dir: str | Path, step: int, *, weights: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
    trainer_state: dict[str, Any], recipe_yaml: str, total_limit: int | None,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically, point ``latest`` at it, prune beyond ``total_limit``.

    ``optimizer=None`` writes no ``optimizer.pt``: under FSDP / DeepSpeed every process has already written its shard
    of the optimizer state into the staging folder's ``accelerate_state/`` (``Accelerator.save_state``), which this
    keeps. Returns the checkpoint folder. Only the main process should call it.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = staging_folder(run_dir, step)
    if not (tmp / SHARDED_STATE).is_dir():
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
    tmp.mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "trainable_weights.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    _save_rng(tmp)
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / LATEST)
    if total_limit is not None:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, optimizer, lr_scheduler, scaler):
    """Restore optimizer (unless None: a sharded state, see :func:`save_checkpoint`), schedule, scaler and RNG from
    ``path`` in place.

    Returns:
        ``(weights, trainer_state)``: the trainable weights (CPU tensors, to load into the model) and the
        ``trainer_state.json`` dict (``step``, ``epoch``, ``batch_in_epoch``, counters).
    """
    path = Path(path)
    weights = load_file(path / "trainable_weights.safetensors")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    _load_rng(path)
    return weights, json.loads((path / "trainer_state.json").read_text())
