"""What every backend shares: error conversion, white outside the slide, metadata parsing, raw JPEG tiles.

Backends differ in how they decode; they must not differ in what the tiler sees. So the out-of-bounds rule
(white), the error type (SlideReadError with a one-line reason) and the zero-decode path (read straight from the
TIFF with tifffile, see `raw_tiles.py`) live here once.
"""

from __future__ import annotations

import abc

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.raw_tiles import RawTileSource, open_raw_tiles
from gpfm_scale.slides.reader import RawTileLayout, SlideReader

logger = logging.getLogger(__name__)

_MAX_REASON = 240


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, cut to a length that fits a run-manifest field."""
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[0].strip() if text else '(no message)'}"
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


@contextlib.contextmanager
def backend_errors(backend: str, path: str, action: str) -> Iterator[None]:
    """Turn any exception a backend library raises into SlideReadError('<backend>: cannot <action> <path>: ...')."""
    try:
        yield
    except SlideReadError:
        raise
    except Exception as exc:
        raise SlideReadError(f"{backend}: cannot {action} {path}: {one_line(exc)}") from exc


def positive_float(value: object) -> float | None:
    """A finite float > 0 parsed from metadata, or None (missing, empty, NaN, zero, negative, not a number)."""
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA uint8 [H, W, 4] (straight alpha, as openslide-python returns) onto white -> new RGB [H, W, 3]."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if alpha.min() == 255:
        return rgb.copy()
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def whiten_outside(
    region: np.ndarray, location: tuple[int, int], downsample: float, level_size: tuple[int, int]
) -> np.ndarray:
    """Set pixels of a level region that fall outside the level to white (255), in place; returns the region.

    region: RGB uint8 [h, w, 3] read at a level whose (width, height) is `level_size`; location: level-0 (x, y) of
    its top-left, mapped to level pixels by floor(location / downsample).
    """
    h, w = region.shape[:2]
    x = math.floor(location[0] / downsample)
    y = math.floor(location[1] / downsample)
    if x >= 0 and y >= 0 and x + w <= level_size[0] and y + h <= level_size[1]:
        return region
    cols = x + np.arange(w)
    rows = y + np.arange(h)
    region[(rows < 0) | (rows >= level_size[1])] = 255
    region[:, (cols < 0) | (cols >= level_size[0])] = 255
    return region


class BackendReader(SlideReader):
    """Common part of the cuCIM, OpenSlide and tiffslide readers: level geometry, argument checks, raw tiles,
    closing. A backend calls `set_levels` once when it opens the slide."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._raw: RawTileSource | None = None
        self._dims: list[tuple[int, int]] = []
        self._downsamples: list[float] = []

    def set_levels(self, dimensions: Iterable[Sequence[float]], downsamples: Iterable[float]) -> None:
        """Record each level's (width, height) in px and downsample vs level 0, as the library reports them."""
        self._dims = [(int(w), int(h)) for w, h in dimensions]
        self._downsamples = [float(d) for d in downsamples]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._dims)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._downsamples)

    def check_request(self, level: int, size: tuple[int, int]) -> None:
        """Raise SlideReadError for a level that does not exist or a size that is not positive."""
        if not 0 <= level < self.level_count:
            raise SlideReadError(f"{self.name}: level {level} out of range for {self.path} ({self.level_count} levels)")
        if size[0] <= 0 or size[1] <= 0:
            raise SlideReadError(f"{self.name}: region size must be positive, got {size}")

    def blank_if_outside(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray | None:
        """All-white RGB [h, w, 3] when the region misses the level entirely (no backend call needed), else None."""
        ds = self.level_downsamples[level]
        x, y = math.floor(location[0] / ds), math.floor(location[1] / ds)
        w, h = self.level_dimensions[level]
        if x >= w or y >= h or x + size[0] <= 0 or y + size[1] <= 0:
            return np.full((size[1], size[0], 3), 255, np.uint8)
        return None

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """The request checked, all white without a backend call when it misses the level, else the backend's
        `_read` with its errors named, whitened outside the level (`finish`)."""
        self.check_request(level, size)
        loc = (int(location[0]), int(location[1]))
        blank = self.blank_if_outside(loc, level, size)
        if blank is not None:
            return blank
        with backend_errors(self.name, self.path, f"read level {level} at {loc}"):
            region = self._read(loc, level, (int(size[0]), int(size[1])))
        return self.finish(region, loc, level)

    @abc.abstractmethod
    def _read(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [H, W, 3] of `level` at level-0 `loc`, as the library returns it, before `finish`."""

    def finish(self, region: np.ndarray, location: tuple[int, int], level: int) -> np.ndarray:
        """White outside the level; every backend passes its output through here."""
        return whiten_outside(region, location, self.level_downsamples[level], self.level_dimensions[level])

    def _raw_tiles(self) -> RawTileSource:
        if self._raw is None:
            self._raw = open_raw_tiles(self.path, self.level_dimensions)
        return self._raw

    def raw_tile_layout(self, level: int) -> RawTileLayout | None:
        if not 0 <= level < self.level_count:
            return None
        return self._raw_tiles().layout(level)

    def read_raw_tile(self, level: int, col: int, row: int) -> bytes:
        return self._raw_tiles().read(level, col, row)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self.close_backend()

    def close_backend(self) -> None:
        """Release the backend library's handle."""
