"""The run folder a training run writes (``output.dir``), its metrics log, and the signals that stop it cleanly.

Layout: ``recipe.yaml`` (the resolved recipe), ``data_report.json``, ``metrics.jsonl`` (one JSON object per logged
step), ``logs/`` (TensorBoard), ``checkpoints/step_N`` (:mod:`lora_dpo.training.checkpoint`), and at the end the
exported adapter or pipeline and its model card (:mod:`lora_dpo.export.artifacts`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
from pathlib import Path

from lora_dpo.config import OutputConfig
from lora_dpo.errors import ConfigError
from lora_dpo.training import checkpoint as ckpt

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


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
    and the same ``train.batch_size``, or pairs would be skipped or seen twice. Raises ConfigError otherwise."""
    state = json.loads((resume_path / "trainer_state.json").read_text())
    saved = state.get("num_processes", 1), state.get("batch_size", batch_size)
    if saved != (world, batch_size):
        raise ConfigError(
            f"{resume_path} was saved by {saved[0]} process(es) with train.batch_size={saved[1]}; this launch has "
            f"{world} with {batch_size}. Resume with the same number of processes and batch size (its data position "
            "counts micro-batches per process), or start a new run"
        )


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop logged steps later than the checkpoint: they are trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


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
