"""`open_slide`: the one way the pipeline opens a slide, trying backends in a configured order.

A backend counts as working for a slide only if it opens it AND decodes a small region at the lowest level: some
libraries open truncated or damaged files happily (cuCIM silently drops the levels whose directories are cut off)
and fail only when pixels are read, which we want to happen here, once, with a reason, not in the middle of tiling.
DICOM slides (a .dcm file, or a folder of .dcm files: one series) go to the DICOM reader whatever the list says:
the TIFF-family readers cannot read them, and their reasons would hide the DICOM one.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from typing import cast

from PIL import Image

from gpfm_scale.errors import ConfigError, SlideReadError
from gpfm_scale.slides import backends  # noqa: F401 - registers the readers in SLIDE_READERS
from gpfm_scale.slides.backends._common import one_line
from gpfm_scale.slides.backends.dicom_reader import is_dicom_path
from gpfm_scale.slides.raw_tiles import tiff_damage
from gpfm_scale.slides.reader import SLIDE_READERS, SlideReader

logger = logging.getLogger(__name__)

DEFAULT_READERS = ("cucim", "openslide", "tiffslide")
PROBE_PX = 64
"""Side of the probe region, in pixels of the lowest level."""
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def probe(reader: SlideReader) -> None:
    """Decode the bottom-right corner of the lowest level (stored last in the file, so truncation shows there).

    cuCIM does not raise on an undecodable JPEG tile (it prints to stderr and returns black pixels), so when the
    level has stored JPEG tiles, the same corner's stored tile is also decoded strictly, independent of the backend.
    """
    level = reader.level_count - 1
    w, h = reader.level_dimensions[level]
    if w <= 0 or h <= 0:
        raise SlideReadError(f"{reader.name}: lowest level {level} is empty ({w}x{h})")
    size = (min(PROBE_PX, w), min(PROBE_PX, h))
    ds = reader.level_downsamples[level]
    location = (int((w - size[0]) * ds), int((h - size[1]) * ds))
    reader.read_region(location, level, size)
    layout = reader.raw_tile_layout(level)
    if layout is not None:
        col, row = (w - 1) // layout.tile_width, (h - 1) // layout.tile_height
        _decode_strictly(
            reader.read_raw_tile(level, col, row), f"{reader.name}: stored tile ({col}, {row}) of level {level}"
        )


def _decode_strictly(jpeg: bytes, what: str) -> None:
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise SlideReadError(f"{what} does not decode: {one_line(exc)}") from exc


def _file_problem(path: str) -> str | None:
    """A reason the path cannot be a slide before any backend looks at it (missing, a folder, empty)."""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return None if is_dicom_path(path) else "is a directory, not a slide file (nor a folder of .dcm files)"
    if os.path.getsize(path) == 0:
        return "file is empty (0 bytes)"
    return None


def _is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


def _header_hint(path: str) -> str:
    """' (not a TIFF-based file: starts with ...)' when the file lacks TIFF magic, so text files are obvious."""
    if _is_tiff(path):
        return ""
    with open(path, "rb") as f:
        return f" (not a TIFF-based file: starts with {f.read(8)!r})"


def open_slide(path: str, readers: Sequence[str] = DEFAULT_READERS, device: str = "cpu") -> SlideReader:
    """Open `path` with the first backend in `readers` that opens it and reads pixels at its lowest level.

    device: "cpu" or "cuda"; passed to each backend (cuCIM decodes on the GPU with "cuda"; the others ignore it).
    Raises SlideReadError naming every backend tried and why it failed; ConfigError for an unknown backend name.
    """
    path = os.fspath(path)
    readers = (readers,) if isinstance(readers, str) else tuple(readers)
    problem = _file_problem(path)
    if problem is not None:
        raise SlideReadError(f"{path}: {problem}")
    dicom = is_dicom_path(path)
    if dicom:
        readers = ("dicom",)
    elif _is_tiff(path):
        damage = tiff_damage(path)
        if damage is not None:
            raise SlideReadError(f"{path}: truncated or damaged TIFF: {damage}")
    if not readers:
        raise ConfigError("slide readers list is empty; give at least one of " + ", ".join(SLIDE_READERS.names()))
    reasons = []
    for name in readers:
        try:
            cls = cast(Callable[..., SlideReader], SLIDE_READERS.get(name))  # backends take (path, device=...)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        reader = None
        try:
            reader = cls(path, device=device)
            probe(reader)
        except SlideReadError as exc:
            reason = str(exc)
            reasons.append(reason if reason.startswith(f"{name}:") else f"{name}: {reason}")
            logger.debug("reader %s refused %s: %s", name, path, exc)
            if reader is not None:
                reader.close()
            continue
        logger.debug("opened %s with %s", path, name)
        return reader
    if dicom:
        raise SlideReadError(f"{path}: {reasons[0]}")
    raise SlideReadError(f"{path}: no reader could open it{_header_hint(path)}: " + "; ".join(reasons))


__all__ = ["DEFAULT_READERS", "open_slide", "probe"]
