"""``lora-dpo`` command line: :func:`main`, the logging set-up, the error handling and the table of commands.

    lora-dpo train RECIPE [section.key=value ...]
    lora-dpo validate RECIPE [section.key=value ...]
    lora-dpo demo [--rounds R] [section.key=value ...]
    lora-dpo iterate RECIPE [--rounds R] [section.key=value ...]
    lora-dpo eval RUN_DIR --scorer ...
    lora-dpo generate MODEL PROMPT ... [--adapter PATH[:SCALE] ...]
    lora-dpo merge MODEL ADAPTER OUT [--scale S] [--unet-only]
    lora-dpo export ADAPTER --format diffusers|peft|kohya --out OUT
    lora-dpo prefs / world ...

Each command is one module of this package (``lora_dpo.cli.<command>``) with ``add_arguments(parser)`` and
``run(args) -> exit code``. :data:`COMMANDS` names those modules; :func:`build_parser` imports (``importlib``) only the
module of the command on the command line, so ``lora-dpo --help`` and an argument error print without importing
torch, diffusers or the stages.

Exit codes: 0 done; 2 bad input (one ``error:`` line on stderr: a config, model, file, value or import error, a
locked run folder, a checkpoint that fails its verification, a full disk); 1 training diverged; a training run stopped
by SIGINT / SIGTERM returns 130 / 143 (:mod:`lora_dpo.cli.train`). ``--debug`` (or ``LORA_DPO_DEBUG=1``) shows the
traceback instead of the one line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import NamedTuple

from lora_dpo.errors import ConfigError, DiskFullError, ModelLoadError, TrainingDiverged
from lora_dpo.library_noise import quiet_known_warnings

EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 1
DEBUG_ENV = "LORA_DPO_DEBUG"  # set to 1: tracebacks instead of one error line, as --debug
# Errors of the input, answered with one line and exit 2 (ValueError covers ConfigError, DataError, CheckpointError).
BAD_INPUT = (ConfigError, ModelLoadError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
             ValueError, ImportError, NotImplementedError, DiskFullError)
# OS errors that are the machine's state, not a bug: also one line, naming the file.
_OS_STATES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}


class Command(NamedTuple):
    """One ``lora-dpo`` command: the module that holds its ``add_arguments`` and ``run``, and its help line."""

    module: str
    help: str


# In the order ``lora-dpo --help`` lists them.
COMMANDS: dict[str, Command] = {
    "train": Command("lora_dpo.cli.train", "train a recipe"),
    "validate": Command("lora_dpo.cli.validate", "check a recipe, its model and its data without training"),
    "cache": Command("lora_dpo.cli.cache",
                     "encode a recipe's pairs once: VAE latents, text embeddings, reference errors"),
    "demo": Command("lora_dpo.cli.demo", "offline demo: LoRA-DPO on the digits world, then its evaluation"),
    "iterate": Command("lora_dpo.cli.iterate", "online DPO in rounds: sample from the policy, score, pair best "
                                               "against worst, train against the previous round, evaluate"),
    "eval": Command("lora_dpo.cli.eval", "compare a trained run with its base model on held-out seeds"),
    "merge": Command("lora_dpo.cli.merge", "fuse a LoRA into the base weights: a pipeline folder that opens alone"),
    "export": Command("lora_dpo.cli.export",
                      "write an adapter in the diffusers, PEFT or kohya (A1111 / ComfyUI) layout"),
    "generate": Command("lora_dpo.cli.generate", "images from a base model plus adapters; PNG metadata; off/on grid"),
    "prefs": Command("lora_dpo.cli.prefs", "preference pairs labelled by a scorer (AI feedback), Pick-a-Pic parquet: "
                                           "sampled from a model (--model) or re-labelled from a data set (--relabel)"),
    "world": Command("lora_dpo.cli.world",
                     "build the digits world: a small real text-to-image model and its AI feedback"),
}


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "diffusers", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # the known harmless library warnings, dropped by message at their loggers (lora_dpo/library_noise.py's table)
    quiet_known_warnings()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def chosen_command(argv: list[str]) -> str | None:
    """The command named on the command line: the first argument that is not an option (the top-level options
    take no value), if it is one of :data:`COMMANDS`; else None (``--help``, no command, a misspelt one)."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (imported on first use)."""
    return importlib.import_module(COMMANDS[name].module)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``lora-dpo`` parser: every command with its help line; the arguments of ``command`` only (its module is
    the one imported)."""
    parser = argparse.ArgumentParser(prog="lora-dpo", description="Diffusion-DPO with LoRA for SD1.5 and SDXL")
    parser.add_argument("--debug", "--traceback", dest="debug", action="store_true",
                        help=f"show the full traceback on errors (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, entry in COMMANDS.items():
        p = sub.add_parser(name, help=entry.help)
        if name == command:
            command_module(name).add_arguments(p)
    return parser


def error_line(exc: BaseException) -> str | None:
    """The one ``error:`` line for an exception that is bad input or the machine's state (a full disk, a denied
    permission), else None (a bug: its traceback is shown)."""
    if isinstance(exc, BAD_INPUT):
        return f"error: {exc}"
    if isinstance(exc, OSError) and exc.errno in _OS_STATES:
        where = f" writing {exc.filename}" if exc.filename else ""
        hint = ("free space there or point output.dir (or the path given) at another disk"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path and its permissions")
        return f"error: {_OS_STATES[exc.errno]}{where}: {hint}"
    return None


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that overrides after an option (``iterate RECIPE --rounds 3 a.b=c``) join
    the command's ``overrides``: argparse gives a ``nargs="*"`` positional its (empty) share at the first positional
    and would call the later ones unrecognized. Exits 2 with argparse's usage line for anything else unknown."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one ``lora-dpo`` command (``argv``: default ``sys.argv[1:]``); return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _setup_logging()  # before the command's module loads, as its imports ran after it when they were in functions
    debug = bool({"--debug", "--traceback"} & set(argv)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:  # the parser imports the command's module: a missing optional dependency is one line too
        args = parse_arguments(build_parser(chosen_command(argv)), argv)
        return command_module(args.command).run(args)
    except TrainingDiverged as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception as exc:
        line = error_line(exc)
        if debug or line is None:
            raise
        print(line, file=sys.stderr)
        return EXIT_BAD_INPUT

if __name__ == "__main__":
    sys.exit(main())
