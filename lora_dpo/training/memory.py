"""Memory of the training process, logged as ``peak_memory_gb``: CUDA's allocator counters on a GPU, this process's
resident set size (Linux ``/proc/self/status``) on the CPU."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_gb`: CUDA's max-allocated counter, or this process's peak RSS
    (Linux ``/proc/self/clear_refs``; elsewhere the peak keeps counting from the process start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def proc_status_gb(field: str) -> float | None:
    """A memory field of Linux ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in GiB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; on the CPU the peak resident set size of this process (``VmHWM``), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = proc_status_gb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_memory_gb(device: torch.device) -> float:
    """CUDA memory allocated now on a GPU; on the CPU this process's resident set size (``VmRSS``), in GiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    current = proc_status_gb("VmRSS")
    return current if current is not None else float("nan")
