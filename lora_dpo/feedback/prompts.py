"""Prompts: the digits world's captions (``a handwritten digit seven`` and back), and prompt files (one per line, or
a column of a table such as PartiPrompts' TSV).

The digits world is a small text-to-image pipeline trained on scikit-learn's handwritten digits; each image is
captioned with the English number word of its digit.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_WORD_RE = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def digit_caption(d: int) -> str:
    """The caption of digit ``d`` (0..9): ``digit_caption(7) == "a handwritten digit seven"``.

    Raises:
        ValueError: ``d`` is not an integer in 0..9.
    """
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9:
        raise ValueError(f"digit must be an integer in 0..9, not {d!r}")
    return f"a handwritten digit {NUMBER_WORDS[d]}"


def digit_captions() -> list[str]:
    """The ten captions, digit 0 first."""
    return [digit_caption(d) for d in range(10)]


def digit_of(caption: str) -> int:
    """The digit named in ``caption`` by its number word (whole word, case-insensitive): 7 for
    ``"a handwritten digit seven"``. The same word repeated counts once.

    Raises:
        ValueError: the caption names no digit, or names two or more different digits.
    """
    found = sorted({NUMBER_WORDS.index(m.lower()) for m in _WORD_RE.findall(caption)})
    if not found:
        raise ValueError(f"caption {caption!r} names no digit; expected one of the words {', '.join(NUMBER_WORDS)}")
    if len(found) > 1:
        names = ", ".join(NUMBER_WORDS[d] for d in found)
        raise ValueError(f"caption {caption!r} names several digits ({names}); expected exactly one")
    return found[0]


PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "text")  # tried in this order when no column is named
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def _table_prompts(path: Path, column: str | None) -> list[str]:
    """The prompts of one column of a table file (PartiPrompts is a TSV with a ``Prompt`` column)."""
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    if kind == "parquet":
        frame = pd.read_parquet(path)
    elif kind in ("jsonl", "json"):
        frame = pd.read_json(path, lines=kind == "jsonl")
    else:
        frame = pd.read_csv(path, sep="\t" if kind == "tsv" else ",", dtype=str, keep_default_na=False)
    names = [str(c) for c in frame.columns]
    name = column or next((c for c in PROMPT_COLUMNS if c in names), None)
    if name is None or name not in names:
        wanted = f"column {column!r}" if column else f"a column named {' / '.join(PROMPT_COLUMNS)}"
        raise ValueError(f"prompts file {path} has no {wanted}; its columns: {', '.join(names)} (pick one with "
                         "--prompt-column)")
    return [str(v).strip() for v in frame[name].tolist() if v is not None and str(v).strip()]


def load_prompts(spec: str, column: str | None = None) -> list[str]:
    """The prompts ``spec`` names: ``"digits"`` -> :func:`digit_captions`; a ``.txt`` (or any other) UTF-8 text file,
    one prompt per line (blank lines and lines starting with ``#`` skipped); or a table (``.csv``, ``.tsv``,
    ``.jsonl``, ``.json``, ``.parquet``), one prompt per row from ``column`` (default: the first of
    :data:`PROMPT_COLUMNS` it has; empty cells skipped). Order and repeats are kept.

    Raises:
        FileNotFoundError: ``spec`` is neither ``"digits"`` nor a file. ValueError: no prompt in it, or a table
            without the column (the message lists its columns).
    """
    if spec == "digits":
        return digit_captions()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompts {spec!r}: not 'digits' and not a file (a .txt with one prompt per line, or "
                                "a .csv / .tsv / .jsonl / .parquet table)")
    if path.suffix.lower() in TABLE_SUFFIXES:
        prompts = _table_prompts(path, column)
    else:
        if column is not None:
            raise ValueError(f"--prompt-column applies to tables (.csv, .tsv, .jsonl, .json, .parquet), not to {path}")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {spec} holds no prompt")
    return prompts
