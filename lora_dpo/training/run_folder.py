"""The run folder a training run writes (``output.dir``), its lock, its metrics log, and the signals that stop it
cleanly.

Layout: ``.lock`` (:class:`RunLock`: one process per folder), ``recipe.yaml`` (the resolved recipe),
``data_report.json``, ``metrics.jsonl`` (one JSON object per logged step), ``logs/`` (TensorBoard),
``checkpoints/step_N`` (:mod:`lora_dpo.training.checkpoint`), and at the end the exported adapter or pipeline and its
model card (:mod:`lora_dpo.export.artifacts`).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

from lora_dpo.config import OutputConfig
from lora_dpo.errors import CheckpointError, ConfigError, RunFolderLocked
from lora_dpo.training import checkpoint as ckpt

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"


class RunLock:
    """One lora-dpo process per folder (a training run's ``output.dir``, a cache being built): an exclusive
    ``flock`` on ``<folder>/.lock``, taken on entry (the folder is created) and held until exit. The file then holds
    ``{pid, host, command, started}`` of the holder, which a refused process shows. A folder the lock created and
    nothing else wrote into (a run refused on bad data) is removed on exit. The kernel releases the lock
    when its process dies, however (``kill -9`` too): a lock file left behind blocks nobody. With ``enabled=False``
    (the other processes of a distributed run) it does nothing.

    Raises:
        RunFolderLocked: on entry, when another process holds the folder (the message names it and what to do).
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, command: str = "train"):
        self.run_dir, self.enabled, self.command = Path(run_dir), enabled, command
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderLocked(self._refusal()) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return self

    def _refusal(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            who = (f"pid {holder['pid']} on {holder['host']}, lora-dpo {holder['command']}, started "
                   f"{holder['started']}")
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process that has only just taken it"
        return (f"{self.run_dir} is in use by another lora-dpo process ({who}; lock file {self.path}): two runs in "
                "one folder would overwrite each other's files. Wait for that process to finish (or stop it), or "
                "use another folder (output.dir for training, --out for a cache)")

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
                if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                    shutil.rmtree(self.run_dir)  # a run that stopped before writing anything leaves no folder
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        return False


def prepare_run_dir(run_dir: Path, output: OutputConfig, resuming: bool) -> None:
    """Create ``run_dir``; refuse to overwrite an earlier run's checkpoints unless asked (``output.overwrite``: they
    are deleted with the old metrics and logs), so no training state is ever lost silently. Raises ConfigError."""
    if not resuming and ckpt.list_checkpoints(run_dir):
        if not output.overwrite:
            raise ConfigError(
                f"{run_dir} already holds checkpoints of an earlier run. Continue it with train.resume_from=latest, "
                "pick another output.dir / output.run_name, or pass output.overwrite=true to start over."
            )
        shutil.rmtree(run_dir / ckpt.CHECKPOINTS)
        for name in (METRICS_FILE, "logs"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def check_resume_layout(resume_path: Path, world: int, batch_size: int) -> None:
    """A checkpoint's data position counts micro-batches per process: resuming it needs the same number of processes
    and the same ``train.batch_size``, or pairs would be skipped or seen twice. Raises ConfigError otherwise, and
    CheckpointError (naming the file) when ``trainer_state.json`` cannot be read."""
    file = resume_path / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {resume_path}: cannot read {file.name} ({exc}); resume from another "
                              "checkpoint or start a new run") from exc
    saved = state.get("num_processes", 1), state.get("batch_size", batch_size)
    if saved != (world, batch_size):
        raise ConfigError(
            f"{resume_path} was saved by {saved[0]} process(es) with train.batch_size={saved[1]}; this launch has "
            f"{world} with {batch_size}. Resume with the same number of processes and batch size (its data position "
            "counts micro-batches per process), or start a new run"
        )


def _logged_step(line: str) -> int | None:
    """The ``step`` of one metrics line, or None if the line is not a JSON object with a numeric step."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop logged steps later than the checkpoint: they are trained again. A last line cut short (the
    run died while writing it) is dropped with a warning; the file is rewritten atomically.

    Raises:
        ValueError: a line other than the last one is not a metrics row (the message names the file and the line).
    """
    if not path.is_file():
        return
    lines = [(number, line) for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1)
             if line.strip()]
    kept = []
    for i, (number, line) in enumerate(lines):
        step = _logged_step(line)
        if step is None and i == len(lines) - 1:
            log.warning("%s: line %d is cut short or unreadable (the run stopped while writing it): dropped", path,
                        number)
        elif step is None:
            raise ValueError(f"{path}, line {number}: not a metrics row (a JSON object with a 'step'): {line[:80]!r}; "
                             "fix or delete that line, then resume again")
        elif step <= after_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLog:
    """``metrics.jsonl`` (truncated to ``step`` on resume) and, with ``tensorboard``, TensorBoard scalars under
    ``logs/``; a no-op on processes other than the main one (``enabled=False``)."""

    def __init__(self, run_dir: Path, step: int, tensorboard: bool, enabled: bool):
        self.path, self.enabled, self.writer = run_dir / METRICS_FILE, enabled, None
        if enabled:
            truncate_metrics(self.path, step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard

                self.writer = SummaryWriter(str(run_dir / "logs"))

    def write(self, metrics: dict, step: int) -> None:
        """Append ``metrics`` as one line; every finite number (but ``step``) as a TensorBoard scalar at ``step``."""
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step; a second one aborts."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received:  # second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting", self.received)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
