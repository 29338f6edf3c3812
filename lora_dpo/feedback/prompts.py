"""Captions of the digits world: ``a handwritten digit seven`` and back.

The digits world is a small text-to-image pipeline trained on scikit-learn's handwritten digits; each image is
captioned with the English number word of its digit.
"""

from __future__ import annotations

import re
from pathlib import Path

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


def load_prompts(spec: str) -> list[str]:
    """``"digits"`` -> :func:`digit_captions`; otherwise a UTF-8 text file, one prompt per line (blank lines and
    lines starting with ``#`` skipped).

    Raises:
        FileNotFoundError: ``spec`` is neither ``"digits"`` nor a file. ValueError: the file holds no prompt.
    """
    if spec == "digits":
        return digit_captions()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompts {spec!r}: not 'digits' and not a text file (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {spec} holds no prompt")
    return prompts
