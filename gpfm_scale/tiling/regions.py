"""Pixels of a tile grid, decoding each of the slide's stored JPEG tiles once.

A 224-px window over 256-px stored tiles touches 2-4 of them, and neighbouring windows share them; reading windows
through the slide library decodes every stored tile it touches again (cuCIM keeps no decoded-tile cache on CPU).
When the read level is JPEG-tiled, this module decodes stored tiles itself (simplejpeg, strict: a damaged tile
raises instead of coming back black) and keeps only the rows of stored tiles the remaining windows still need
(the grid is sorted by (y, x)). The pixels are those of the readers, to the byte: the same libjpeg-turbo decode of
the same standalone JPEG (checked in tests/unit/tiling/test_regions.py).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import simplejpeg

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.grid import TileGrid
from gpfm_scale.slides.reader import RawTileLayout, SlideReader


def _decode(reader: SlideReader, level: int, col: int, row: int) -> np.ndarray:
    try:
        return simplejpeg.decode_jpeg(reader.read_raw_tile(level, col, row), colorspace="RGB")
    except ValueError as err:
        raise SlideReadError(f"stored tile ({col}, {row}) of level {level} does not decode: {err}") from err


def _banded_regions(reader: SlideReader, grid: TileGrid, layout: RawTileLayout) -> Iterator[np.ndarray]:
    tw, th = layout.tile_width, layout.tile_height
    width, height = grid.read_level_size
    size, ds, level = grid.read_size_px, grid.read_downsample, grid.read_level
    cache: dict[tuple[int, int], np.ndarray] = {}
    for x0, y0 in grid.coords.tolist():
        x, y = int(round(x0 / ds)), int(round(y0 / ds))
        for key in [k for k in cache if k[1] < y // th]:  # rows above this window are never needed again
            del cache[key]
        out = np.full((size, size, 3), 255, np.uint8)  # outside the level: white, as the readers do
        x_end, y_end = min(x + size, width), min(y + size, height)
        for row in range(y // th, (y_end - 1) // th + 1):
            for col in range(x // tw, (x_end - 1) // tw + 1):
                tile = cache.get((col, row))
                if tile is None:
                    tile = cache[(col, row)] = _decode(reader, level, col, row)
                ys, ye = max(y, row * th), min(y_end, (row + 1) * th)
                xs, xe = max(x, col * tw), min(x_end, (col + 1) * tw)
                out[ys - y:ye - y, xs - x:xe - x] = tile[ys - row * th:ye - row * th, xs - col * tw:xe - col * tw]
        yield out


def _library_regions(reader: SlideReader, grid: TileGrid, batch_size: int) -> Iterator[np.ndarray]:
    locations = [(int(x), int(y)) for x, y in grid.coords]
    size = (grid.read_size_px, grid.read_size_px)
    for (x, y), region in zip(locations, reader.read_regions(locations, grid.read_level, size, batch_size)):
        if not region.any():
            # cuCIM returns black instead of raising on a JPEG tile it cannot decode: never pass that on as data.
            raise SlideReadError(f"{reader.name} returned an all-black tile at ({x}, {y}): damaged JPEG data?")
        yield region


def grid_regions(reader: SlideReader, grid: TileGrid, batch_size: int = 32) -> Iterator[np.ndarray]:
    """RGB uint8 [read_size, read_size, 3] per grid coordinate, in grid order (before any resize)."""
    layout = reader.raw_tile_layout(grid.read_level)
    if layout is not None and layout.compression == "jpeg" and len(grid.coords):
        return _banded_regions(reader, grid, layout)
    return _library_regions(reader, grid, batch_size)
