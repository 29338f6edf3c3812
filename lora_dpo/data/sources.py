"""Opening a preference data set in any supported layout as Pick-a-Pic-schema rows, and loading it checked.

:func:`open_checked` opens ``data.dataset`` (hub id, files, globs, folders, ``save_to_disk`` folders, ``w/`` +
``l/`` pair folders), maps other layouts into the configured columns, checks the columns and leaves image
columns undecoded; :func:`load_preference_dataset` runs the load-time checks of :mod:`lora_dpo.data.filters` over
it and returns the kept rows. A data set that cannot be read as a whole (no rows, a text file in another encoding
than ``data.encoding``, a file that is not what its suffix says) raises one :class:`lora_dpo.errors.DataError`
naming the file, also when a stream meets it later (:func:`read_rows`).
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from huggingface_hub import constants as hub_constants

from lora_dpo.config import DataConfig
from lora_dpo.data.files import (
    BUILDERS,
    TEXT_BUILDERS,
    file_problem,
    no_rows_error,
    read_failure,
    read_text,
)
from lora_dpo.data.filters import Admission, RowScanner, scan_rows
from lora_dpo.data.images import IMAGE_SUFFIXES, ImageBase, MissingImage, find_image_file
from lora_dpo.errors import DataError
from lora_dpo.models.pretrained import HUB_ID, hub_unreachable, offline_message

logger = logging.getLogger(__name__)

# What reading a data file that is not what its suffix says raises (datasets, pyarrow, pandas, json, codecs):
# translated into a DataError naming the file (:func:`read_failure`).
_READ_ERRORS = (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError, StopIteration)
# Hub-style shard names (``push_to_hub``, Pick-a-Pic's ``data/train-00000-of-00645-….parquet``): SPLIT-i-of-n.
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z][A-Za-z0-9_]*)-\d+-of-\d+")
# The convention of pair tables without a label: the preferred and the rejected image, in these columns.
_PAIR_COLUMNS = ("preferred", "rejected")


def _did_you_mean(name: str, choices: list[str], key: str) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.0)
    return f"set {key}{', e.g. to ' + repr(close[0]) if close else ''}"


def check_columns(column_names: list[str], cfg: DataConfig, source: str) -> None:
    """Raise ValueError naming each missing column, the available ones and the DataConfig field to set (an unpaired
    set: ``data.image_column`` and ``data.desirable_column``)."""
    wanted = [(cfg.caption_column, "data.caption_column")]
    if cfg.unpaired:
        wanted += [(cfg.image_column, "data.image_column"), (cfg.desirable_column, "data.desirable_column")]
    else:
        wanted += [(cfg.image_columns[0], "data.image_columns"), (cfg.image_columns[1], "data.image_columns")]
        if cfg.label_column is not None:
            wanted.append((cfg.label_column, "data.label_column"))
    missing = [(col, key) for col, key in wanted if col not in column_names]
    if missing:
        hints = [f"column '{col}' ({_did_you_mean(col, column_names, key)})" for col, key in missing]
        keys = {key for _, key in missing}
        extra = ""
        if "data.image_columns" in keys and {"image_0_uid", "image_1_uid"} <= set(column_names):
            extra = (" This looks like Pick-a-Pic's *_no_images layout (image uids instead of image bytes): "
                     "set data.image_columns=[image_0_uid, image_1_uid] and data.image_root to the folder of "
                     "the images.")
        elif keys == {"data.label_column"}:
            extra = " If the first image column always holds the preferred image, set data.label_column=null."
        elif "data.image_columns" in keys and cfg.image_column in column_names:
            extra = (f" The set has an '{cfg.image_column}' column: if each row is one image with a desirable / "
                     "undesirable label (Diffusion-KTO), set data.unpaired=true and loss.type=kto.")
        available = ", ".join(column_names)
        raise ValueError(f"dataset '{source}' lacks {'; '.join(hints)}. Available columns: {available}."
                         + extra)


def _check_optional_columns(column_names: list[str], cfg: DataConfig) -> None:
    """The columns of the optional filters: score columns (``min_score_gap``) and a renamed
    ``are_different``."""
    if cfg.min_score_gap is not None:
        missing = [c for c in cfg.score_columns if c not in column_names]
        if missing:
            raise ValueError(
                f"data.min_score_gap needs score columns {missing} in '{cfg.dataset}' (set "
                f"data.score_columns); available columns: {', '.join(column_names)}"
            )
    # The default name is Pick-a-Pic's and optional; a name the recipe chose must exist (a typo would silently
    # turn the filter off).
    name = cfg.are_different_column
    if name not in (None, "are_different") and name not in column_names:
        raise ValueError(
            f"data.are_different_column='{name}' is not a column of '{cfg.dataset}' "
            f"({_did_you_mean(name, column_names, 'data.are_different_column')}, or null for no such "
            f"filter); available columns: {', '.join(column_names)}"
        )


def _image_root(cfg: DataConfig) -> ImageBase | None:
    """``data.image_root`` as a confined :class:`ImageBase` (no image file outside it is read), or None."""
    if cfg.image_root is None:
        return None
    root = Path(cfg.image_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.image_root='{cfg.image_root}' is not a folder; set it to the folder "
                                f"that holds the image files named in the image columns")
    return ImageBase(root, confined=True)


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


@contextlib.contextmanager
def _read_errors(cfg: DataConfig, files: list[Path] | None = None) -> Iterator[None]:
    """Errors of reading the data (:data:`_READ_ERRORS`) -> a DataError naming the file (:func:`read_failure`;
    ``files`` default: the data set's local files, listed again)."""
    try:
        yield
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise read_failure(exc, _files_of(cfg) if files is None else files, cfg) from exc


_END = object()


def read_rows(rows: Iterable[Any], cfg: DataConfig) -> Iterator[Any]:
    """The items of ``rows`` (an ``IterableDataset`` of ``cfg.dataset``, or its ``.iter(batch_size)``), each
    read under :func:`_read_errors`: a file that turns out empty, undecodable in ``data.encoding`` or not what its
    suffix says mid-stream raises a DataError naming it, not a reader's traceback.

    Raises:
        DataError: a data file cannot be read (the message names it and what to do).
    """
    iterator = iter(rows)
    while True:
        with _read_errors(cfg):
            row = next(iterator, _END)
        if row is _END:
            return
        yield row


def _load_files(files: list[Path], cfg: DataConfig, streaming: bool) -> Any:
    """``load_dataset(builder, data_files=files)``: a ``Dataset`` (an ``IterableDataset`` when streaming;
    its first row read here, so an unreadable first file fails now). CSV / JSON are read with
    ``data.encoding``. Files are checked first (:func:`file_problem`: in memory, emptiness, parquet footers and a
    decode pass over JSON text; only emptiness when streaming); a CSV's bad byte is named when pandas meets it.

    Raises:
        FileNotFoundError: no data files, or files of no supported suffix.
        ValueError: files of several kinds.
        DataError: a file (or the whole set) has no rows, is not valid ``data.encoding`` text, or is not what
            its suffix says.
    """
    builders = {BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders:
        raise FileNotFoundError(
            f"data.dataset='{cfg.dataset}' holds no .parquet/.arrow/.json/.jsonl/.csv data; point "
            f"data.dataset at such a file, a folder or glob of them, a save_to_disk folder or a w/+l/ folder"
        )
    if len(builders) > 1:
        raise ValueError(f"'{cfg.dataset}' mixes file types ({sorted(builders)}); point data.dataset at one "
                         f"kind")
    # Streaming: only what a stat tells (the files may be many and large). The text pass is for JSON only: pyarrow's
    # JSON reader keeps undecodable bytes, while pandas' CSV reader raises on them and read_failure names the byte.
    for path in files:
        problem = file_problem(path, cfg, len(files) > 1, footer=not streaming,
                               text=not streaming and BUILDERS.get(path.suffix) == "json")
        if problem is not None:
            raise problem
    builder = builders.pop()
    options = {"encoding": cfg.encoding} if builder in TEXT_BUILDERS else {}
    with _read_errors(cfg, files):
        loaded = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train",
                                       cache_dir=cfg.cache_dir, streaming=streaming, **options)
        empty = next(iter(loaded), None) is None if streaming else len(loaded) == 0
    if empty:
        raise no_rows_error(cfg)
    return loaded


def _split_files(files: list[Path], folder: Path, split: str) -> list[Path]:
    """Of a folder whose files are all hub-style shards (``SPLIT-00000-of-00009…``, as in a snapshot of a hub
    data set), those of ``split``: mixing Pick-a-Pic's train and test shards would train on the test set. Any
    other folder: all its files."""
    matches = [_SHARD_NAME.match(p.name) for p in files]
    if not files or not all(matches):
        return files
    chosen = [p for p, m in zip(files, matches) if m["split"] == split]
    if not chosen:
        splits = sorted({m["split"] for m in matches})
        raise ValueError(f"'{folder}' holds the splits {splits} (shards named SPLIT-00000-of-NNNNN), not "
                         f"data.split='{split}'; set data.split to one of them")
    return chosen


def _pair_folder(root: Path, cfg: DataConfig) -> datasets.Dataset:
    """A folder of pairs as files -> rows of the Pick-a-Pic schema (the configured columns; label 1.0).

    Layout (diffusers' ImageFolder ``metadata.jsonl`` convention)::

        root/metadata.jsonl   one JSON object per line: {"file_name": "0001.png", "caption": "a red fox"}
        root/w/0001.png       the preferred image
        root/l/0001.png       the rejected image (same relative file name; subfolders allowed)

    The caption key is ``data.caption_column``. Rows: the metadata's file names in order, then image names
    found under ``w/`` or ``l/`` without a metadata line (sorted; they have no caption: ``missing_caption``).
    An image missing on one side is counted as ``missing_image_file`` by the load-time checks.
    """
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        example = json.dumps({"file_name": "0001.png", cfg.caption_column: "the caption"})
        raise FileNotFoundError(f"'{root}' has w/ and l/ image folders but no metadata.jsonl; write one line "
                                f"per pair: {example}")
    captions: dict[str, Any] = {}
    keys: set[str] = set()
    for n, line in enumerate(read_text(meta, cfg.encoding).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta}:{n} is not a JSON object ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise ValueError(f'{meta}:{n} lacks "file_name" (the image\'s name under w/ and l/)')
        keys.update(record)
        captions.setdefault(record["file_name"], record.get(cfg.caption_column))
    if captions and cfg.caption_column not in keys:
        keys.discard("file_name")
        raise ValueError(f"{meta} has no '{cfg.caption_column}' key "
                         f"({_did_you_mean(cfg.caption_column, sorted(keys), 'data.caption_column')}); "
                         f"keys: {', '.join(sorted(keys))}")
    found = {
        p.relative_to(root / side).as_posix()
        for side in ("w", "l") for p in (root / side).rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    }
    names = list(captions) + sorted(found - set(captions))
    columns: dict[str, list] = {
        cfg.caption_column: [captions.get(name) for name in names],
        cfg.image_columns[0]: [str(root / "w" / name) for name in names],
        cfg.image_columns[1]: [str(root / "l" / name) for name in names],
    }
    if cfg.label_column is not None:
        columns[cfg.label_column] = [1.0] * len(names)
    features = datasets.Features({name: datasets.Value("float64" if name == cfg.label_column else "string")
                                  for name in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def _files_of(cfg: DataConfig) -> list[Path]:
    """The local data files ``cfg.dataset`` names: a glob's files, a file, a folder's files (hidden ones
    excepted; hub-style shards of ``cfg.split``, :func:`_split_files`); [] for anything else (a hub id, a
    ``save_to_disk`` or ``w/`` + ``l/`` folder)."""
    path = Path(cfg.dataset).expanduser()
    if _is_glob(cfg.dataset):
        return sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
    if path.is_file():
        return [path]
    if not path.is_dir() or _is_pair_folder(path) or _is_saved(path):
        return []
    return _split_files(sorted(
        p for p in path.rglob("*")
        if p.suffix in BUILDERS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ), path, cfg.split)


def _is_pair_folder(path: Path) -> bool:
    return path.is_dir() and (path / "w").is_dir() and (path / "l").is_dir()


def _is_saved(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _in_memory(ds: datasets.Dataset, cfg: DataConfig, streaming: bool) -> Any:
    """A loaded ``Dataset`` (as an ``IterableDataset`` when ``streaming``). Raises DataError when it has no rows."""
    if len(ds) == 0:
        raise no_rows_error(cfg)
    return ds.to_iterable_dataset() if streaming else ds


def _load_hub(name: str, cfg: DataConfig, streaming: bool) -> Any:
    """``data.dataset`` given as a hub id: ``load_dataset(name, split=data.split)`` (a stream when ``streaming``).

    Raises:
        FileNotFoundError: ``name`` is not of the form org/name (said at once, no network), the hub cannot be
            reached (said at once, :func:`lora_dpo.models.pretrained.hub_unreachable`; under ``HF_HUB_OFFLINE`` the
            datasets cache is read), or the data set cannot be loaded.
    """
    if not HUB_ID.match(name):
        raise FileNotFoundError(
            f"data.dataset='{name}' is neither a file or folder (a relative path is read from the current directory, "
            f"{Path.cwd()}) nor a hub id of the form org/name: set data.dataset=/path/to/parquet (a file, a folder, "
            f"or a glob such as '/data/train-*.parquet') or a hub id such as yuvalkirstain/pickapic_v2"
        )
    if hub_unreachable() and not hub_constants.is_offline_mode():
        raise FileNotFoundError(offline_message(name, "data.dataset", "copy of the data (a parquet file, a folder "
                                                "or a glob)", "/path/to/parquet", repo_type="dataset"))
    try:
        loaded = datasets.load_dataset(name, split=cfg.split, cache_dir=cfg.cache_dir, streaming=streaming)
    except (FileNotFoundError, ConnectionError) as exc:
        raise FileNotFoundError(
            f"data.dataset='{name}' is not a local path and could not be loaded from the hub ({exc}). "
            f"Check the id and the network (offline, HF_HUB_OFFLINE=1 needs the data in the cache: "
            f"data.cache_dir or HF_DATASETS_CACHE), or download it (e.g. `hf download {name} --repo-type "
            f"dataset --local-dir DIR`) and set data.dataset=DIR or a glob such as "
            f"'DIR/data/train-*.parquet'"
        ) from exc
    return loaded if streaming else _in_memory(loaded, cfg, streaming)


def _open_source(cfg: DataConfig, streaming: bool = False) -> tuple[Any, ImageBase | None]:
    """Open ``cfg.dataset`` (see :func:`load_preference_dataset`) as a ``Dataset``, or an ``IterableDataset``
    when ``streaming``. Returns it and the base that relative image paths are resolved against:
    ``data.image_root`` (confined: no image outside it is read), else the data's folder (None for hub data); a
    ``w/`` + ``l/`` pair folder: that folder, confined."""
    name = cfg.dataset
    path = Path(name).expanduser()
    root = _image_root(cfg)
    if _is_glob(name):
        files = _files_of(cfg)
        if not files:
            raise FileNotFoundError(f"data.dataset='{name}' matches no file; check the pattern (e.g. "
                                    f"/data/pickapic/train-*.parquet)")
        fixed = path.parts[: next(i for i, part in enumerate(path.parts) if _is_glob(part))]  # folders above
        return _load_files(files, cfg, streaming), root or ImageBase(Path(*fixed) if fixed else Path.cwd())
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.suffix in BUILDERS
    if not path.exists():
        if looks_local or name.count("/") > 1:
            raise FileNotFoundError(
                f"data.dataset='{name}' does not exist (a relative path is read from the current directory, "
                f"{Path.cwd()}). Set data.dataset to a .parquet/.arrow/.json/.jsonl/.csv file, a folder or glob of "
                f"such files, a Dataset.save_to_disk folder, a w/ + l/ pair folder, or a hub id such as "
                f"yuvalkirstain/pickapic_v2"
            )
        return _load_hub(name, cfg, streaming), root
    if _is_pair_folder(path):  # its own folder, confined: a symlink in w/ or l/ reads nothing outside it
        return _in_memory(_pair_folder(path, cfg), cfg, streaming), ImageBase(path, confined=True)
    if _is_saved(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise ValueError(f"'{name}' has splits {list(loaded)}, not data.split='{cfg.split}'")
            loaded = loaded[cfg.split]
        return _in_memory(loaded, cfg, streaming), root or ImageBase(path)
    files = _files_of(cfg)
    return _load_files(files, cfg, streaming), root or ImageBase(path if path.is_dir() else path.parent)


def _column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    """Column names; a stream of unknown features (json, csv) is asked for its first row."""
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)
    return list(first) if first is not None else []


def _map_pair_columns(ds: Any, names: list[str], cfg: DataConfig) -> tuple[Any, list[str]]:
    """A table of ``preferred``/``rejected`` image columns (e.g. a CSV ``caption,preferred,rejected``),
    holding neither configured image column nor the label column -> the Pick-a-Pic schema: the two columns
    renamed to ``data.image_columns`` (preferred first) and a label column of 1.0. Any other table:
    unchanged."""
    present = set(names)
    if cfg.unpaired or present & set(cfg.image_columns) or not set(_PAIR_COLUMNS) <= present or cfg.label_column in present:
        return ds, names
    ds = ds.rename_columns(dict(zip(_PAIR_COLUMNS, cfg.image_columns)))
    if cfg.label_column is not None:
        if isinstance(ds, datasets.IterableDataset):
            features = None
            if ds.features is not None:
                features = ds.features.copy()
                features[cfg.label_column] = datasets.Value("float64")
            ds = ds.map(lambda _row: {cfg.label_column: 1.0}, features=features)
        else:
            ds = ds.add_column(cfg.label_column, [1.0] * len(ds))
    logger.info("data %s: columns %s read as the preferred and the rejected image", cfg.dataset,
                _PAIR_COLUMNS)
    names = [cfg.image_columns[_PAIR_COLUMNS.index(n)] if n in _PAIR_COLUMNS else n for n in names]
    return ds, names + ([cfg.label_column] if cfg.label_column is not None else [])


def undecoded(ds: Any, columns: tuple[str, ...] | list[str]) -> Any:
    """Image-feature columns switched to ``decode=False`` (``{"bytes", "path"}`` dicts): decoding happens in
    :class:`lora_dpo.data.pairs.PairDataset`, where a corrupt image becomes a
    :class:`lora_dpo.data.pairs.SkippedRow` instead of an exception."""
    for col in columns:
        feature = ds.features[col] if ds.features is not None else None
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _check_supported(cfg: DataConfig) -> None:
    if not cfg.drop_ties:
        raise ValueError("data.drop_ties=false is not supported: a tie has no preferred image; set "
                         "data.drop_ties=true")


def open_checked(cfg: DataConfig, streaming: bool) -> tuple[Any, ImageBase | None, RowScanner]:
    """Open the source, map its layout into the Pick-a-Pic schema, check the columns; returns the source (only
    the columns the checks read, images undecoded), the image base (:class:`lora_dpo.data.images.ImageBase`) and
    the row checks. A stream's rows are read with :func:`read_rows`.

    Raises:
        FileNotFoundError, ValueError, DataError: as :func:`load_preference_dataset`.
    """
    _check_supported(cfg)
    source, base = _open_source(cfg, streaming)
    with _read_errors(cfg):
        names = _column_names(source)
    source, names = _map_pair_columns(source, names, cfg)
    check_columns(names, cfg, cfg.dataset)
    _check_optional_columns(names, cfg)
    return undecoded(source, cfg.row_image_columns), base, RowScanner(cfg, base, names)


def _resolved_path(value: Any, base: ImageBase | None) -> Any:
    """A kept row's path or uid -> the absolute path of its file (already checked: inside a confined base); a value
    that no longer resolves stays as it was (the per-pair processing then skips it)."""
    try:
        found = find_image_file(value, base) if isinstance(value, str) and value.strip() else None
    except MissingImage:  # changed on disk since the checks
        return value
    return str(found.absolute()) if found is not None else value


def _nothing_kept(cfg: DataConfig, report: dict[str, Any], base: ImageBase | None) -> DataError:
    """The error of a data set whose every row was skipped: the counts, and where image paths are looked up."""
    hint, folder = "", base.folder if base is not None else "the working directory"
    if report["skipped"].get("missing_image_file"):
        hint = f". Image paths are resolved against data.image_root, else the data's folder ({folder})"
    if report["skipped"].get("image_outside_root"):
        hint += (f". Image files must lie inside {folder} (data.image_root, or the w/ + l/ folder; symlinks "
                 f"followed): point data.image_root at the folder that holds them")
    return DataError(f"no usable {'labeled images' if cfg.unpaired else 'preference pairs'} in "
                     f"data.dataset='{cfg.dataset}': {report}{hint}")


def load_preference_dataset(cfg: DataConfig) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Load Pick-a-Pic-schema rows (or, with ``cfg.unpaired``, rows of one image and its binary label); return
    ``(dataset of kept rows, report)``.

    ``cfg.dataset`` may be:

    - a hub id (``load_dataset(id, split=cfg.split)``; offline, it needs the data in the datasets cache);
    - a local .parquet/.arrow/.json/.jsonl/.csv file, or a glob of them (``/data/pickapic/train-*.parquet``);
    - a folder of such files (all of them, recursively, hidden ones excepted; when every file is a hub-style
      shard ``SPLIT-00000-of-NNNNN…``, as in a downloaded snapshot, only those of ``cfg.split``);
    - a ``Dataset.save_to_disk`` folder (a saved DatasetDict is indexed by ``cfg.split``);
    - a folder with ``w/`` and ``l/`` subfolders of images and a ``metadata.jsonl`` (:func:`_pair_folder`).

    Layouts mapped into the Pick-a-Pic schema: a table with ``preferred``/``rejected`` columns and none of the
    configured image columns (e.g. a CSV ``caption,preferred,rejected``: renamed, label 1.0); any table with
    ``data.label_column=null`` (the first image column is the preferred one). Image columns hold bytes,
    datasets images, or paths: relative paths (and Pick-a-Pic's uids, which name a file once a suffix such as
    ``.jpg`` is appended) are resolved against ``cfg.image_root``, else the data file's folder (or the given
    folder), and returned absolute. Under ``cfg.image_root`` (and in a ``w/`` + ``l/`` folder) a path whose
    real path leaves that folder (``..``, absolute, ``~``, a symlinked file or folder pointing elsewhere) is
    never read: the row is skipped as ``image_outside_root``. CSV and JSON files are read as ``cfg.encoding``
    text. Image-feature columns are returned with ``decode=False`` so
    :class:`lora_dpo.data.pairs.PairDataset` decodes them. Hub data needs ``cfg.image_root`` for path columns
    (``pickapic_v2_no_images``: ``image_columns=[image_0_uid, image_1_uid]``).

    Rows are skipped, counted by reason: ``bad_label`` (label not in {0, 0.5, 1}), ``tie`` (0.5),
    ``not_different`` (the ``cfg.are_different_column`` is false), ``missing_caption`` (None / not a string),
    ``missing_image`` (no value), ``missing_image_file`` (a path that names no file), ``image_outside_root``
    (a path outside ``cfg.image_root``), ``undecodable_image``
    (header does not open); with ``cfg.min_score_gap``: ``missing_score``, ``small_score_gap`` (``|score_0 -
    score_1| < min_score_gap``); with ``cfg.drop_identical_images``: ``identical_images`` (the two images'
    bytes are equal); with ``cfg.drop_duplicates``: ``duplicate`` (same caption, preferred and rejected image
    bytes as an earlier kept row; the same pair stored the other way round with the opposite label is a
    duplicate too). The hash filters read every image in full (sha1), which the header checks do not. Scanning
    stops once ``cfg.max_pairs`` rows are kept (the first N kept rows). With ``cfg.num_proc`` the checks run
    in that many processes (``datasets.map``), all rows, then the same in-order decisions.

    Returns:
        report: ``{"rows": total rows, "scanned": rows checked, "kept": n, "skipped": {reason: rows},
        "converted": {reason: images}}`` (see :class:`lora_dpo.data.filters.SkipCounter`).

    Raises:
        FileNotFoundError: the path does not exist / holds no data, ``cfg.image_root`` is not a folder, or the
            hub id cannot be loaded (offline: the message says how to use a local copy).
        ValueError: a required column is missing (names it, the available ones and the DataConfig field),
            ``cfg.drop_ties`` is False (unsupported), ``cfg.streaming`` is True (use
            :class:`lora_dpo.data.streaming.StreamedPairs`).
        DataError (a ValueError): the data set (or one of its files) has no rows, a CSV / JSON file is not valid
            ``cfg.encoding`` text (the message names the byte, its position, ``data.encoding`` and ``iconv``), a
            file is not what its suffix says (unreadable parquet, CSV, JSON), or no row survives the checks.
    """
    if cfg.streaming:
        raise ValueError("data.streaming=true reads the data as a stream: use lora_dpo.data.loader.StreamedPairs "
                         "(load_preference_dataset loads the whole data set); or set data.streaming=false")
    raw, base, scanner = open_checked(cfg, streaming=False)
    admission, kept = Admission(), []
    for i, result in enumerate(scan_rows(raw.select_columns(scanner.columns), scanner, cfg.num_proc)):
        if len(kept) == cfg.max_pairs:
            break
        if admission.admit(*result):
            kept.append(i)
    report = {"rows": len(raw), **admission.report()}
    logger.info("data %s: %d rows, %d scanned, %d kept, skipped %s, converted %s", cfg.dataset, len(raw),
                report["scanned"], len(kept), report["skipped"], report["converted"])
    if not kept:
        raise _nothing_kept(cfg, report, base)
    dataset = raw.select(kept)
    for col in cfg.row_image_columns:
        if dataset.features[col] in (datasets.Value("string"), datasets.Value("large_string")):
            dataset = dataset.map(lambda v, c=col: {c: _resolved_path(v, base)}, input_columns=col)
    return dataset, report
