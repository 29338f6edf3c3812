"""Known harmless warnings of the libraries lora-dpo uses, dropped at their source by message, in one table.

Each row of :data:`KNOWN_WARNINGS` names where a warning comes from (the Python logger of the library module that
logs it, or a :mod:`warnings` category), a regular expression of its message, and why it is harmless for lora-dpo.
:func:`quiet_known_warnings` installs a :class:`logging.Filter` on each of those loggers (and a ``warnings`` filter
per category row), so only those messages go: no logger's level changes, and any other warning of the same logger
still shows. The command line calls it before any library loads (``lora_dpo.cli.main``); API users call it once,
before importing diffusers / transformers / peft (some of these are logged at import time)::

    from lora_dpo.library_noise import quiet_known_warnings
    quiet_known_warnings()
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import NamedTuple


class KnownWarning(NamedTuple):
    """One known harmless warning.

    logger: the name of the logger that logs it (the library module's ``__name__``), or None for a
        :mod:`warnings` warning. category: the warning's class for a :mod:`warnings` row, else None.
    pattern: a regular expression searched in the formatted message (``record.getMessage()``); for a
        :mod:`warnings` row, matched from the start of the message, as ``warnings.filterwarnings`` does.
    why: why lora-dpo can ignore it. example: the message as the library prints it (the tests emit it).
    """

    logger: str | None
    category: type[Warning] | None
    pattern: str
    why: str
    example: str


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        "transformers.utils.import_utils", None,
        r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",
        "transformers 5 names its torchvision backend CLIPImageProcessor and falls back to the PIL one without "
        "torchvision; diffusers touches CLIPImageProcessor / SiglipImageProcessor on import. lora-dpo's scorers use "
        "the PIL processor on purpose (feedback/clip_scorers.py), so nothing changes with or without torchvision.",
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
        "backward compatibility. Install torchvision to use the default backend, or import "
        "`CLIPImageProcessorPil` directly to silence this warning.",
    ),
    KnownWarning(
        "diffusers.loaders.lora_base", None,
        r"^No LoRA keys associated to \w+ found with the prefix='text_encoder(_\d)?'",
        "lora-dpo adapters hold denoiser (UNet / transformer) weights only; pipe.load_lora_weights also looks for text-encoder keys and says "
        "it found none, on every adapter load. (An adapter without UNet keys is refused before loading: "
        "models/lora_files.py check_adapter_fits.)",
        "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe to ignore if "
        "LoRA state dict didn't originally have any CLIPTextModel related params. You can also try specifying "
        "`prefix=None` to resolve the warning. Otherwise, open an issue if you think it's unexpected: "
        "https://github.com/huggingface/diffusers/issues/new",
    ),
    KnownWarning(
        "diffusers.models.modeling_utils", None,
        r"^There are modules in \w+ that should be kept in float32: \[\]\.",
        "the list is empty: no module of the model must stay in float32, so casting it with .to(dtype) (merge's "
        "--dtype) is exact. A non-empty list still shows.",
        "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly with "
        "`to()` can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead to keep these "
        "modules in float32.",
    ),
    KnownWarning(
        "bitsandbytes.backends.cpu.ops", None,
        r"^Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",
        "an optional faster CPU kernel for 4-bit matrix products (the 'kernels' package), looked for when "
        "bitsandbytes is imported; bitsandbytes falls back to its own CPU code, which gives the same products (a "
        "4-bit base, model.quantization=nf4, on the CPU runs there: slower, not different).",
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure "
        "you already `pip install kernels` and the kernels >= 0.11.1",
    ),
    KnownWarning(
        None, UserWarning,
        r"^You have passed exclude_modules=proj_out but no modules were excluded",
        "FLUX adapters carry exclude_modules=proj_out in their LoRA config (the model's output layer is not one of "
        "the single blocks' proj_out targets). Loading a saved adapter, diffusers takes the targets from the file's "
        "keys, so nothing is left to exclude and PEFT says so; the loaded adapter is the trained one (tested).",
        "You have passed exclude_modules=proj_out but no modules were excluded. Please check that exclude_modules "
        "was set correctly.",
    ),
)


class KnownMessageFilter(logging.Filter):
    """Drops the records of one logger whose formatted message matches one of ``patterns`` (regular expressions,
    searched); lets every other record through."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) when the message matches a known pattern; True otherwise. A message that cannot be
        formatted is let through (logging reports that error itself)."""
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(p.search(message) for p in self.patterns)


def quiet_known_warnings() -> None:
    """Drop the messages of :data:`KNOWN_WARNINGS` at their source; idempotent (a second call changes nothing).

    For each logger of the table, one :class:`KnownMessageFilter` on that logger (created now if the library has
    not been imported yet; the library gets the same logger object later); for each ``warnings`` row, one
    ``warnings.filterwarnings("ignore", ...)``. Levels and handlers are left as they are. Call it before importing
    diffusers, transformers or peft: some rows are logged while those import.
    """
    by_logger: dict[str, list[str]] = {}
    for row in KNOWN_WARNINGS:
        if row.logger is not None:
            by_logger.setdefault(row.logger, []).append(row.pattern)
        else:  # filterwarnings drops an identical earlier filter before inserting: calling it twice is harmless
            warnings.filterwarnings("ignore", message=row.pattern.removeprefix("^"), category=row.category or Warning)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, KnownMessageFilter)]:
            logger.removeFilter(old)
        logger.addFilter(KnownMessageFilter(patterns))
