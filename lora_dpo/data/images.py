"""Image values -> PIL images: where an image's data is, opening, RGB conversion, resizing, digests.

An image value is bytes, a datasets ``{"bytes", "path"}`` dict, a PIL image, or a path / uid (str) resolved
against a base folder (:class:`ImageBase`; under ``data.image_root`` no file outside it is read).
:class:`MissingImage` marks a value that holds no image; any other failure to read one
is the caller's ``undecodable_image``. Used by the load-time checks (:mod:`lora_dpo.data.filters`), the per-pair
processing (:mod:`lora_dpo.data.pairs`) and the relabelling of preference sets (:mod:`lora_dpo.feedback.prefs`).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Image files: the suffixes of a w/ + l/ pair folder, and those tried after a name that is not a file (uids).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_GRAY_MODES = {"1", "L", "I", "F"}


class MissingImage(Exception):
    """A row's image is absent: ``reason`` is ``missing_image`` (no value), ``missing_image_file`` (a path
    or uid that names no file) or ``image_outside_root`` (a path that leaves a confined :class:`ImageBase`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageBase:
    """The folder that relative image paths and uids are resolved against. ``confined``: every image file must
    lie inside it, its real path (``..``, an absolute path, ``~``, symlinked files and folders followed) compared
    with the folder's real path; set for ``data.image_root`` and for a ``w/`` + ``l/`` pair folder."""

    folder: Path
    confined: bool = False
    real: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "real", self.folder.resolve())

    def check(self, path: Path) -> None:
        """Nothing when ``path`` may be read (unconfined, or its real path lies inside the folder).

        Raises:
            MissingImage: ``image_outside_root`` (the real path lies outside the folder) or ``missing_image_file``
                (the path cannot be resolved: a symlink loop).
        """
        if not self.confined:
            return
        try:
            inside = path.resolve().is_relative_to(self.real)
        except (OSError, RuntimeError):  # a symlink loop: nothing to read there
            raise MissingImage("missing_image_file") from None
        if not inside:
            raise MissingImage("image_outside_root")


def find_image_file(name: str, base: ImageBase | None) -> Path | None:
    """The file ``name`` names (relative names resolved against ``base.folder``), else ``name`` + one of
    :data:`IMAGE_SUFFIXES` (first found, in that order: Pick-a-Pic's uids carry no suffix), else None. With a
    confined ``base`` the name and the file found are checked (:meth:`ImageBase.check`) before anything is
    read: a file outside the folder is never opened.

    Raises:
        MissingImage: ``image_outside_root``: ``base`` is confined and the name or the file found lies outside it.
    """
    path = Path(name).expanduser()
    if base is not None:
        path = path if path.is_absolute() else base.folder / path
        base.check(path)
    if not path.name:
        return None
    candidates = [path, *(path.with_name(path.name + suffix) for suffix in IMAGE_SUFFIXES)]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is not None and base is not None:
        base.check(found)  # a symlinked file (or the uid's suffixed file) may point elsewhere
    return found


def image_source(value: Any, base: ImageBase | None) -> bytes | Path | Image.Image:
    """Where an image value's data is: bytes, a file, or an open PIL image. A value is bytes, a datasets
    ``{"bytes", "path"}`` dict, a PIL image, or a path / uid (str, found by :func:`find_image_file`).

    Raises:
        MissingImage: no value (None, empty, NaN from a CSV cell), a path that names no file, or one outside a
            confined ``base`` (``image_outside_root``).
        TypeError: any other kind of value.
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise MissingImage("missing_image")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise MissingImage("missing_image")
        return bytes(value)
    if isinstance(value, str):
        if not value.strip():
            raise MissingImage("missing_image")
        found = find_image_file(value, base)
        if found is None:
            raise MissingImage("missing_image_file")
        return found
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def open_image(value: Any, base: ImageBase | None = None) -> Image.Image:
    """Open lazily (header only) an image value (see :func:`image_source`; relative paths resolved against
    ``base``). Raises :class:`MissingImage` when there is no image (or it lies outside a confined ``base``),
    OSError etc. when the data is not an image."""
    source = image_source(value, base)
    if isinstance(source, Image.Image):
        return source
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def image_digest(value: Any, base: ImageBase | None = None) -> bytes:
    """sha1 of the image's stored bytes (the file's bytes for a path; the pixels for a PIL image). Raises as
    :func:`image_source`, OSError when the file cannot be read."""
    source = image_source(value, base)
    if isinstance(source, Image.Image):
        data = source.mode.encode() + repr(source.size).encode() + source.tobytes()
    else:
        data = source if isinstance(source, bytes) else source.read_bytes()
    return hashlib.sha1(data).digest()


def image_conversions(img: Image.Image, resolution: int) -> list[str]:
    """The conversion reasons :func:`to_rgb` and the resize will apply to ``img`` (header information only)."""
    reasons = []
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        reasons.append("rgba")
    elif img.mode == "P":
        reasons.append("palette")
    elif img.mode in _GRAY_MODES or img.mode.startswith("I;16"):
        reasons.append("grayscale")
    elif img.mode != "RGB":
        reasons.append("other_mode")
    width, height = img.size
    if min(width, height) < resolution:
        reasons.append("upscaled")
    if width % 8 or height % 8:
        reasons.append("odd_size")
    return reasons


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white; 16/32-bit grayscale is scaled by 1/257
    (16-bit range assumed); float images are clipped to [0, 255]."""
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0 if img.mode.startswith("I") else arr
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_short_side(img: Image.Image, resolution: int) -> Image.Image:
    """Resize (Lanczos) so the short side equals ``resolution``, keeping the aspect ratio."""
    width, height = img.size
    if min(width, height) == resolution:
        return img
    if width <= height:
        size = (resolution, max(resolution, round(height * resolution / width)))
    else:
        size = (max(resolution, round(width * resolution / height)), resolution)
    return img.resize(size, Image.Resampling.LANCZOS)
