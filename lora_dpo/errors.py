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


class DataError(ValueError):
    """The data set cannot be read as a whole (empty, a text file in another encoding, a file that is not what its
    suffix says). The message names the file and the option or conversion that fixes it. Bad rows are not errors:
    they are skipped and counted."""


class CorruptFileError(ValueError):
    """A weights file is truncated or corrupt (a safetensors header that does not fit its file, offsets past its end).
    The message names the file and says where a good copy comes from."""


class RunFolderLocked(ConfigError):
    """Another lora-dpo process (training, ``cache`` build) holds the run folder's lock. The message names the
    process (pid, command) that holds it."""


class CheckpointError(ValueError):
    """A checkpoint failed its verification (a missing file, a SHA-256 that differs from its manifest) or cannot be
    read. The message names the checkpoint and the file."""


class DiskFullError(OSError):
    """No space left on the device while writing. The message names the folder and, when known, the bytes needed."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stopped and its last good checkpoint is kept."""


__all__ = [
    "AdapterMismatchError", "CheckpointError", "ConfigError", "CorruptFileError", "DataError", "DiskFullError", "ModelLoadError",
    "RunFolderLocked", "TrainingDiverged", "UnsafeFileError",
]
