"""Data files that cannot be read as a whole, told apart and named: an empty file, a parquet file whose footer does
not read or that holds no rows, a text file that is not valid ``data.encoding``; and the :class:`DataError` for an
error a reader (``datasets``, pyarrow, pandas) raised, naming the file at fault. Used by
:mod:`lora_dpo.data.sources` when it opens a data set and while a stream is read.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lora_dpo.config import DataConfig
from lora_dpo.errors import DataError

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
TEXT_BUILDERS = {"json", "csv"}  # read with data.encoding


def no_rows_error(cfg: DataConfig, detail: str = "") -> DataError:
    what = "labeled images" if cfg.unpaired else "preference pairs"
    return DataError(f"data set '{cfg.dataset}' has no rows{detail}: point data.dataset at data that holds {what}")


def first_undecodable_byte(path: Path, encoding: str) -> tuple[int, int] | None:
    """``(byte, position)``: the first byte of ``path`` that is not valid ``encoding`` text and its offset in the
    file, or None when the whole file decodes. Reads the file once, 1 MiB at a time."""
    decoder, offset = codecs.getincrementaldecoder(encoding)("strict"), 0
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character, carried from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:  # exc.object is the pending bytes + this chunk
                return exc.object[exc.start], max(offset - pending + exc.start, 0)
            if not chunk:
                return None
            offset += len(chunk)


def encoding_error(path: Path, encoding: str, byte: int, position: int) -> DataError:
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return DataError(f"'{path}' is not valid {encoding} text (byte 0x{byte:02x} at position {position}): set "
                     f"data.encoding=latin-1 (or the file's encoding), or convert it: iconv -f latin1 -t utf-8 "
                     f"'{path}' > '{converted}'")


def read_text(path: Path, encoding: str) -> str:
    """The text of ``path``. Raises DataError (naming the byte, its position and data.encoding) when it is not
    valid ``encoding`` text."""
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        byte, position = first_undecodable_byte(path, encoding) or (0, 0)
        raise encoding_error(path, encoding, byte, position) from None


def file_problem(path: Path, cfg: DataConfig, many: bool, *, footer: bool = True,
                  text: bool = False) -> DataError | None:
    """What makes one data file unreadable: empty (0 bytes); with ``footer``, a .parquet whose footer does not
    read or that has no rows; with ``text``, a .csv/.json/.jsonl that is not valid ``data.encoding`` text (reads
    the file). None when none of these. ``many``: the file is one of several (the message names it)."""
    where = f" in '{path}'" if many else ""
    if path.stat().st_size == 0:
        return no_rows_error(cfg, f"{where} (an empty file: 0 bytes{', remove it' if many else ''})")
    builder = BUILDERS.get(path.suffix)
    if footer and builder == "parquet":
        try:
            rows = pq.read_metadata(path).num_rows
        except (pa.ArrowException, OSError) as exc:
            return DataError(f"'{path}' is not a readable parquet file ({one_line(exc)}); data.dataset="
                             f"'{cfg.dataset}': replace the file (truncated? another format under a .parquet name?) "
                             f"or remove it")
        if rows == 0:
            return no_rows_error(cfg, f"{where} (a parquet file of 0 rows{', remove it' if many else ''})")
    if text and builder in TEXT_BUILDERS:
        found = first_undecodable_byte(path, cfg.encoding)
        if found is not None:
            return encoding_error(path, cfg.encoding, *found)
    return None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the command line prints one ``error:`` line)."""
    return " ".join(str(exc).split())


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during (``__cause__`` / ``__context__``), outermost first."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def read_failure(exc: BaseException, files: list[Path], cfg: DataConfig) -> DataError:
    """The DataError for ``exc``, raised while reading ``files`` (the data set's local files; [] for a hub id):
    the file that is empty, not valid ``data.encoding`` text or not a parquet file when one is found, else the
    data set and the innermost error."""
    causes = _causes(exc)
    decode = next((c for c in causes if isinstance(c, UnicodeDecodeError)), None)
    for path in files:
        problem = file_problem(path, cfg, len(files) > 1, text=decode is not None)
        if problem is not None:
            return problem
    if decode is not None:
        return DataError(f"data.dataset='{cfg.dataset}' is not valid {cfg.encoding} text ({one_line(decode)}): "
                         f"set data.encoding=latin-1 (or the data's encoding), or convert it to utf-8 (iconv)")
    if any(isinstance(c, StopIteration) or "corresponds to no data" in str(c) for c in causes):
        return no_rows_error(cfg)
    root = causes[-1]
    kinds = sorted({BUILDERS[p.suffix] for p in files if p.suffix in BUILDERS}) or ["a data set"]
    where = f"'{files[0]}'" if len(files) == 1 else f"data.dataset='{cfg.dataset}'"
    what = "it is" if len(files) == 1 else "each file is"
    return DataError(f"{where} could not be read as {' / '.join(kinds)} ({type(root).__name__}: {one_line(root)}); "
                     f"check that {what} what its suffix says and not truncated")
