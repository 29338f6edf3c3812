"""Resumable training state: written atomically, verified against its manifest, kept with retention, restored exactly.

A checkpoint ``<run>/checkpoints/step_N/`` holds everything needed to continue bit-for-bit: the trainable
weights (``trainable_weights.safetensors``), optimizer and LR-scheduler state (``optimizer.pt``,
``scheduler.pt``, plus ``scaler.pt`` under fp16), the global RNG states (``rng_state.safetensors`` + ``.json``:
torch, CUDA, numpy, python; the training draws need none, they are keyed by pair: :mod:`lora_dpo.data.draws`), the
position in the data (``trainer_state.json``), the resolved ``recipe.yaml`` and, written last, ``manifest.json``: the
SHA-256 and size of every other file (``accelerate_state/`` included, under FSDP / DeepSpeed).

How it is written, so that a crash (even ``kill -9``) at any point leaves a checkpoint that resume can trust:
every file is written into the staging folder ``.tmp-step_N`` and fsynced; the manifest is written to a temporary
name, fsynced and renamed; the folders are fsynced; then the staging folder is renamed to ``step_N`` and
``checkpoints/latest`` is replaced atomically. Old checkpoints are first renamed to ``.deleting-step_N`` and only
then removed, so a half-deleted one never looks like a checkpoint. Resume verifies the manifest before it reads a
byte (:func:`verify_checkpoint`); ``train.resume_from=latest`` skips the checkpoints that do not verify.
The exported adapter (``pytorch_lora_weights.safetensors`` in the run folder) is a different, small artifact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_dpo.errors import CheckpointError, DiskFullError
from lora_dpo.models.lora_files import save_safetensors

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
SHARDED_STATE = "accelerate_state"  # FSDP / DeepSpeed: Accelerator.save_state, every process its shard
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # of manifest.json
DELETING = ".deleting-"  # an old checkpoint being removed: renamed first, so it never looks like a checkpoint
REJECTED = "rejected-"  # a checkpoint set aside by :func:`quarantine_checkpoint`
REJECTED_NOTE = "REJECTED.txt"
# Every checkpoint has these, plus optimizer.pt or the sharded state (accelerate_state/).
REQUIRED = ("trainable_weights.safetensors", "scheduler.pt", "rng_state.safetensors", "rng_state.json",
            "trainer_state.json", "recipe.yaml")
_MANIFEST_TMP = ".manifest.json.tmp"
_ADVICE = ("resume from another checkpoint (train.resume_from=latest skips the ones that do not verify) or start a "
           "new run")


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints of a run, oldest first: the ``step_N`` folders that hold a manifest (or, written by an older
    lora-dpo, a ``trainer_state.json``). Staging (``.tmp-step_N``), half-deleted (``.deleting-step_N``), rejected
    (``rejected-step_N``) and empty folders are ignored. Listed is not verified: see :func:`verify_checkpoint`."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and _step_of(p) >= 0]
    return sorted((p for p in found if (p / MANIFEST).is_file() or (p / "trainer_state.json").is_file()),
                  key=_step_of)


# ----------------------------------------------------------------------------------------------------------------
# Verification


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (the command line prints one ``error:`` line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def file_digest(path: Path, sync: bool = False) -> dict[str, Any]:
    """``{"sha256", "bytes"}`` of a file; with ``sync``, its data is also flushed to the disk (fsync)."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return {"sha256": sha.hexdigest(), "bytes": size}


def _read_manifest(path: Path) -> dict[str, dict]:
    """The ``files`` of ``path``'s manifest. Raises CheckpointError (no folder, no manifest, one that cannot be
    parsed or is not of this format)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a folder); {_ADVICE}")
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {MANIFEST}: it is incomplete (the run stopped while writing it) or was written "
            f"by an older lora-dpo, whose checkpoints cannot be verified; {_ADVICE}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} cannot be parsed ({_first_line(exc)}); {_ADVICE}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT_VERSION or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
            for e in files.values()):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a lora-dpo manifest of format {FORMAT_VERSION} "
                              f"(format, files: {{path: {{sha256, bytes}}}}); {_ADVICE}")
    return files


def verify_checkpoint(path: str | Path) -> None:
    """Check every file of checkpoint ``path`` against its ``manifest.json`` (presence, size, SHA-256), and that the
    manifest lists the files a resume reads.

    Raises:
        CheckpointError: naming the checkpoint and the file: no manifest (incomplete, or written by an older
            lora-dpo), an unparsable manifest, a missing file, a size or SHA-256 that differs from the manifest.
    """
    path = Path(path)
    files = _read_manifest(path)
    missing = [name for name in REQUIRED if name not in files]
    if "optimizer.pt" not in files and not any(name.startswith(SHARDED_STATE + "/") for name in files):
        missing.append("optimizer.pt")
    if missing:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {', '.join(missing)}; {_ADVICE}")
    for name, entry in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} names {name}, outside the checkpoint; {_ADVICE}")
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing (listed in {MANIFEST}); {_ADVICE}")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, {MANIFEST} says {entry['bytes']} "
                                  f"(truncated or overwritten); {_ADVICE}")
        if file_digest(file)["sha256"] != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: the SHA-256 of {name} differs from {MANIFEST} (the file is "
                                  f"corrupt); {_ADVICE}")


def last_good_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies (:func:`verify_checkpoint`), or None. Raises nothing."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            log.warning("checkpoint %s does not verify: %s", path, exc)
            continue
        return path
    return None


def _resume_candidates(root: Path) -> list[Path]:
    """Where ``latest`` looks, in order: the pointer's target, then the other checkpoints, newest first."""
    first = []
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name and "/" not in name and name not in (".", ".."):
            first = [root / name]
    return first + [p for p in reversed(list_checkpoints(root.parent)) if p not in first]


def resolve_resume(resume_from: str, run_dir: str | Path) -> Path:
    """``latest`` -> the newest checkpoint of ``run_dir`` that verifies: the one ``checkpoints/latest`` names, else the
    others newest first (each skipped one logged with the reason, and the fallback too); otherwise the given folder,
    which must verify.

    Raises:
        FileNotFoundError: nothing to resume from (no checkpoint; the given folder does not exist).
        CheckpointError: the given checkpoint does not verify, or none of the run's does (the message lists each
            one tried and why).
    """
    if resume_from != LATEST:
        path = Path(resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume_from={resume_from} is not a checkpoint folder (no such folder)")
        verify_checkpoint(path)
        return path
    root = Path(run_dir) / CHECKPOINTS
    candidates = _resume_candidates(root)
    if not candidates:
        raise FileNotFoundError(
            f"train.resume_from=latest: no checkpoint in {root}; start without train.resume_from, or point "
            "output.dir at the run to continue"
        )
    tried = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            log.warning("train.resume_from=latest: skipping %s: %s", path.name, exc)
            tried.append(f"{path.name} ({exc})")
            continue
        if tried:
            log.warning("train.resume_from=latest: resuming from %s, the newest checkpoint that verifies (skipped %s)",
                        path, ", ".join(p.name for p in candidates[:len(tried)]))
        return path
    raise CheckpointError(f"train.resume_from=latest: no checkpoint in {root} verifies; tried {'; '.join(tried)}")


# ----------------------------------------------------------------------------------------------------------------
# Writing: the primitives (each one a point a crash can hit; the fault tests stop the process at each of them)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to the disk."""
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so a full disk raises OSError(ENOSPC) (a path gives no errno)."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically (replacing a file ``dst``), and flush the folder that holds it."""
    os.replace(src, dst)
    _fsync_dir(dst.parent)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _delete_checkpoint(path: Path) -> None:
    """Remove a checkpoint folder: renamed to ``.deleting-<name>`` first, so a crash midway leaves nothing that
    looks like a checkpoint (the next save removes the leftover)."""
    aside = path.parent / f"{DELETING}{path.name}"
    _remove_tree(aside)
    _replace(path, aside)
    _remove_tree(aside)


def _point_latest(root: Path, name: str) -> None:
    """``checkpoints/latest`` := ``name``, atomically."""
    tmp = root / f".{LATEST}.tmp"
    _write_text(tmp, name)
    _replace(tmp, root / LATEST)


def _write_manifest(folder: Path, step: int) -> None:
    """Hash and fsync every file of ``folder``, write ``manifest.json`` atomically, then fsync the folders."""
    files, folders = {}, [folder]
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir():
            folders.append(path)
        elif rel not in (MANIFEST, _MANIFEST_TMP):
            files[rel] = file_digest(path, sync=True)
    _write_text(folder / _MANIFEST_TMP, json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=2))
    _replace(folder / _MANIFEST_TMP, folder / MANIFEST)
    for path in reversed(folders):  # deepest first
        _fsync_dir(path)


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
    save_safetensors(tensors, folder / "rng_state.safetensors")
    py_version, py_state, py_gauss = random.getstate()
    extra = {"numpy": [kind, pos, has_gauss, cached], "python": [py_version, list(py_state), py_gauss]}
    _write_text(folder / "rng_state.json", json.dumps(extra))


@contextmanager
def _reading(checkpoint: Path, name: str) -> Iterator[None]:
    """Turn any error while reading (or restoring from) ``name`` into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: cannot restore from {name} ({type(exc).__name__}: "
                              f"{_first_line(exc)}); {_ADVICE}") from exc


def _load_rng(folder: Path) -> None:
    with _reading(folder, "rng_state.safetensors"):
        tensors = load_file(folder / "rng_state.safetensors")
        torch.set_rng_state(tensors["torch"])
    with _reading(folder, "rng_state.json"):
        extra = json.loads((folder / "rng_state.json").read_text())
        kind, pos, has_gauss, cached = extra["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        py_version, py_state, py_gauss = extra["python"]
        random.setstate((py_version, tuple(py_state), py_gauss))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        with _reading(folder, "rng_state.safetensors"):
            torch.cuda.set_rng_state_all(cuda)


def _torch_load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def staging_folder(run_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place (the same path on every process)."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-step_{step}"


def _clean_leftovers(root: Path, step: int) -> None:
    """Remove what crashed saves left: half-deleted checkpoints and other steps' staging folders."""
    for path in root.iterdir():
        if path.name.startswith(DELETING) or (path.name.startswith(".tmp-step_") and path.name != f".tmp-step_{step}"):
            _remove_tree(path)


def _is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain (safetensors and torch report it in their message only)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _disk_full(root: Path, tmp: Path, step: int, weights: dict, optimizer) -> DiskFullError:
    """The DiskFullError of a checkpoint that did not fit; removes its staging folder."""
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
    estimate = _tensor_bytes(weights) + (_tensor_bytes(optimizer.state_dict()) if optimizer is not None else 0)
    estimate += sum(p.stat().st_size for p in (tmp / SHARDED_STATE).rglob("*") if p.is_file()) \
        if (tmp / SHARDED_STATE).is_dir() else 0
    needed = max(written, estimate + (1 << 20))  # + the small files: schedule, RNG, recipe, manifest
    _remove_tree(tmp)
    free = shutil.disk_usage(root).free
    pointer = root / LATEST
    previous = pointer.read_text().strip() if pointer.is_file() else "none"
    error = DiskFullError(
        f"no space left on the device while writing checkpoint step_{step} into {root}: it needs about "
        f"{needed / 2**20:.1f} MiB ({needed} bytes), {free / 2**20:.1f} MiB ({free} bytes) are free. The unfinished "
        f"checkpoint was removed; the previous one ({previous}) and checkpoints/latest are intact. Free space (or "
        "lower train.checkpoints_total_limit), then continue with train.resume_from=latest")
    error.errno = errno.ENOSPC
    return error


def _write_state(tmp: Path, step: int, weights, optimizer, lr_scheduler, scaler, trainer_state: dict,
                 recipe_yaml: str) -> None:
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                     tmp / "trainable_weights.safetensors")
    if optimizer is not None:
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
    _torch_save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        _torch_save(scaler.state_dict(), tmp / "scaler.pt")
    _save_rng(tmp)
    _write_text(tmp / "recipe.yaml", recipe_yaml)
    _write_text(tmp / "trainer_state.json", json.dumps({"step": step, **trainer_state}, indent=2))
    _write_manifest(tmp, step)


def save_checkpoint(
    run_dir: str | Path, step: int, *, weights: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
    trainer_state: dict[str, Any], recipe_yaml: str, total_limit: int | None,
) -> Path:
    """Write ``checkpoints/step_<step>`` (files, then its manifest, all fsynced; see the module docstring), point
    ``latest`` at it, prune beyond ``total_limit`` (and remove what crashed saves left).

    ``optimizer=None`` writes no ``optimizer.pt``: under FSDP / DeepSpeed every process has already written its shard
    of the optimizer state into the staging folder's ``accelerate_state/`` (``Accelerator.save_state``), which this
    keeps (and lists in the manifest). Returns the checkpoint folder. Only the main process should call it.

    Raises:
        DiskFullError: no space left while writing; the unfinished checkpoint is removed, the previous one and
            ``latest`` are intact (the message names the folder, the bytes needed and the bytes free).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root, step)
    final = root / f"step_{step}"
    tmp = staging_folder(run_dir, step)
    if not (tmp / SHARDED_STATE).is_dir():
        _remove_tree(tmp)  # a crashed earlier attempt
    tmp.mkdir(exist_ok=True)
    try:
        _write_state(tmp, step, weights, optimizer, lr_scheduler, scaler, trainer_state, recipe_yaml)
    except BaseException as exc:
        if _is_disk_full(exc):
            raise _disk_full(root, tmp, step, weights, optimizer) from exc
        _remove_tree(tmp)
        raise
    if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save): the old one aside
        aside = root / f"{DELETING}{final.name}"
        _replace(final, aside)
        _replace(tmp, final)
        _remove_tree(aside)
    else:
        _replace(tmp, final)
    _point_latest(root, final.name)
    if total_limit is not None:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            if old != final:
                _delete_checkpoint(old)
    return final


def load_checkpoint(path: str | Path, *, optimizer, lr_scheduler, scaler, verify: bool = True):
    """Verify ``path`` (:func:`verify_checkpoint`; ``verify=False`` skips it, for a path that
    :func:`resolve_resume` has just verified: hashing a large checkpoint twice takes time), then restore optimizer
    (unless None: a sharded state, see :func:`save_checkpoint`), schedule, scaler and RNG from it in place.

    Returns:
        ``(weights, trainer_state)``: the trainable weights (CPU tensors, to load into the model) and the
        ``trainer_state.json`` dict (``step``, ``epoch``, ``batch_in_epoch``, counters).
    Raises:
        CheckpointError: the checkpoint does not verify, or a file cannot be read or restored (a parse error, a
            state that does not fit the optimizer, a missing key); the message names the checkpoint and the file.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    with _reading(path, "trainer_state.json"):
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    with _reading(path, "trainable_weights.safetensors"):
        weights = load_file(path / "trainable_weights.safetensors")
    if optimizer is not None:
        with _reading(path, "optimizer.pt"):
            optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    with _reading(path, "scheduler.pt"):
        lr_scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").is_file():
        with _reading(path, "scaler.pt"):
            scaler.load_state_dict(_torch_load(path / "scaler.pt"))
    _load_rng(path)
    return weights, state


def quarantine_checkpoint(run_dir: str | Path, step: int, reason: str) -> Path | None:
    """Set checkpoint ``step_<step>`` aside (e.g. its weights produced a NaN loss): renamed ``rejected-step_<step>``
    (which :func:`list_checkpoints` ignores), with ``reason`` in its ``REJECTED.txt``; ``latest`` then names the newest
    remaining checkpoint that verifies (or is removed). Returns the new folder, or None when there is no such
    checkpoint. Raises OSError only if the rename itself fails."""
    root = Path(run_dir) / CHECKPOINTS
    path = root / f"step_{step}"
    if not path.is_dir():
        return None
    target, n = root / f"{REJECTED}{path.name}", 1
    while target.exists():
        target, n = root / f"{REJECTED}{path.name}-{n}", n + 1
    _replace(path, target)
    _write_text(target / REJECTED_NOTE, reason.rstrip() + "\n")
    good = last_good_checkpoint(run_dir)
    if good is not None:
        _point_latest(root, good.name)
    else:
        (root / LATEST).unlink(missing_ok=True)
    log.warning("checkpoint %s set aside as %s (%s); checkpoints/latest: %s", path.name, target.name, reason,
                good.name if good else "none")
    return target
