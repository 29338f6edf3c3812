"""The exception types that the command line turns into one ``error:`` line (exit 2) or a stop (exit 1).

They live here, below every stage, so that ``lora_dpo.cli`` can catch them without importing the stages that raise
them. Each message names the key, file or model at fault and says what to do.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override is invalid. The message names the key and says what to do."""


class ModelLoadError(ValueError):
    """The model path or id cannot be used; the message says what to pass instead."""


class UnsafeFileError(ValueError):
    """A pickle file (or anything that is not safetensors) was given where lora-dpo reads weights."""


class AdapterMismatchError(ValueError):
    """The adapter was trained for another model (e.g. SDXL vs SD1.5): its modules or shapes do not fit."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stopped and its last good checkpoint is kept."""


__all__ = ["AdapterMismatchError", "ConfigError", "ModelLoadError", "TrainingDiverged", "UnsafeFileError"]
