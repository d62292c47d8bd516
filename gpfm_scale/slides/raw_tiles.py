"""Zero-decode tile copying: a level's stored JPEG tiles, straight from the TIFF, as standalone JPEG files.

Why: decoding a tile and re-encoding it costs ~1 ms of CPU and a second generation of JPEG loss; copying the
slide's own compressed bytes runs ~10x faster and is lossless with respect to the slide. It works only when the
tiling grid equals the stored tile grid (same level, same tile size, aligned), which the tiler decides.

How a stored TIFF JPEG tile becomes a standalone JPEG:
- tables apart (JPEGTables tag, as Aperio writes): SOI + the tables (without their SOI/EOI) + the tile stream
  (without its SOI). Abbreviated streams are legal in TIFF but not on their own.
- photometric RGB (Aperio): the components are R, G, B, not Y, Cb, Cr. Decoders assume YCbCr for 3-component
  streams without a JFIF/Adobe marker saying otherwise, so we insert an Adobe APP14 marker with transform 0.
- tifffile-written tiles (YCbCr, tables inline) are already complete streams and are returned unchanged.
Edge tiles are stored full-size (padded) in TIFF; the bytes are returned as stored.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Sequence

import tifffile

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.reader import RawTileLayout

logger = logging.getLogger(__name__)

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
ADOBE_APP14_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
"""APP14 'Adobe' segment: length 14, version 100, flags 0/0, transform 0 (components are stored untransformed)."""

_JPEG = 7  # TIFF Compression tag value of "new-style" JPEG
_RGB, _YCBCR = 2, 6  # TIFF PhotometricInterpretation values


def standalone_jpeg(tile: bytes, jpegtables: bytes | None, photometric_rgb: bool) -> bytes:
    """Make one stored TIFF JPEG tile decodable on its own (see the module docstring for the rules)."""
    if not tile.startswith(SOI):
        raise SlideReadError(f"stored tile does not start with a JPEG SOI marker (first bytes {tile[:4]!r})")
    parts = [SOI]
    if photometric_rgb:
        parts.append(ADOBE_APP14_RGB)
    if jpegtables:
        tables = jpegtables[2:] if jpegtables.startswith(SOI) else jpegtables
        parts.append(tables[:-2] if tables.endswith(EOI) else tables)
    parts.append(tile[2:])
    return b"".join(parts)


class RawTileSource:
    """Stored JPEG tiles of one TIFF-based slide, with one tifffile handle kept open for the reader's life.

    Levels are matched to TIFF pages by size: `level_dimensions` is the reader's own list of (width, height), so
    level k here is exactly the reader's level k (a level with no page of that size gets no raw layout).
    """

    def __init__(self, path: str, level_dimensions: Sequence[tuple[int, int]]) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._tif: tifffile.TiffFile | None = None
        self._pages: dict[int, tifffile.TiffPage] = {}
        try:
            self._tif = tifffile.TiffFile(path)
            self._pages = self._match_pages(self._tif, level_dimensions)
        except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as exc:
            logger.debug("no raw tiles for %s: %s", path, exc)
            self.close()

    @staticmethod
    def _match_pages(
        tif: tifffile.TiffFile, level_dimensions: Sequence[tuple[int, int]]
    ) -> dict[int, tifffile.TiffPage]:
        by_size: dict[tuple[int, int], tifffile.TiffPage] = {}
        series = tif.series[0] if tif.series else None
        for level in [series, *series.levels[1:]] if series is not None else []:
            page = level.keyframe
            by_size.setdefault((page.imagewidth, page.imagelength), page)
        return {k: by_size[dims] for k, dims in enumerate(level_dimensions) if dims in by_size}

    def layout(self, level: int) -> RawTileLayout | None:
        """The stored tile geometry when `level` is tiled 8-bit RGB/YCbCr JPEG, else None."""
        page = self._pages.get(level)
        if page is None or not page.is_tiled or page.compression != _JPEG:
            return None
        if page.samplesperpixel != 3 or page.bitspersample != 8 or page.photometric not in (_RGB, _YCBCR):
            return None
        if page.tiledepth > 1 or len(page.dataoffsets) == 0:
            return None
        return RawTileLayout(level=level, tile_width=page.tilewidth, tile_height=page.tilelength, compression="jpeg")

    def grid_shape(self, level: int) -> tuple[int, int]:
        """(columns, rows) of stored tiles at `level`; edge tiles included."""
        page = self._page(level)
        return -(-page.imagewidth // page.tilewidth), -(-page.imagelength // page.tilelength)

    def read(self, level: int, col: int, row: int) -> bytes:
        """Tile (col, row) of `level` as a standalone JPEG byte string. Raises SlideReadError when impossible."""
        page = self._page(level)
        cols, rows = self.grid_shape(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise SlideReadError(f"{self.path}: raw tile ({col}, {row}) outside level {level}'s {cols}x{rows} tiles")
        index = row * cols + col
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0:
            raise SlideReadError(f"{self.path}: raw tile ({col}, {row}) of level {level} is empty (sparse TIFF)")
        assert self._tif is not None
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count:
            raise SlideReadError(
                f"{self.path}: raw tile ({col}, {row}) of level {level} is truncated ({len(data)} of {count} bytes)"
            )
        try:
            return standalone_jpeg(data, page.jpegtables, photometric_rgb=page.photometric == _RGB)
        except SlideReadError as exc:
            raise SlideReadError(f"{self.path}: raw tile ({col}, {row}) of level {level}: {exc}") from exc

    def _page(self, level: int) -> tifffile.TiffPage:
        if self.layout(level) is None:
            raise SlideReadError(f"{self.path}: level {level} has no stored JPEG tiles to copy")
        return self._pages[level]

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
        self._tif = None
        self._pages = {}


def tiff_damage(path: str | os.PathLike[str]) -> str | None:
    """Why a TIFF is cut short (a half-copied upload), or None when it looks whole or is no TIFF tifffile parses.

    Checks that the chain of image directories ends properly (the last one's next-IFD pointer is 0) and that every
    page's stored tiles/strips end inside the file. Backends disagree on truncated files: some refuse them, cuCIM
    drops the levels it cannot find, tiffslide decodes a cut JPEG tile as grey without an error. This check does
    not depend on any of them.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            return _damage(tif)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, struct.error) as exc:
        logger.debug("no TIFF structure check for %s: %s", path, exc)
        return None


def _damage(tif: tifffile.TiffFile) -> str | None:
    fh, fmt = tif.filehandle, tif.tiff
    size = fh.size
    pages = list(tif.pages)
    for page in pages:
        ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            return f"page {page.index} data ends at byte {max(ends)}, beyond the file's {size} bytes"
    if tif.is_ndpi or not pages:
        return None
    last = pages[-1].offset
    fh.seek(last)
    tagno = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))[0]
    fh.seek(last + fmt.tagnosize + tagno * fmt.tagsize)
    raw = fh.read(fmt.offsetsize)
    if len(raw) < fmt.offsetsize:
        return f"directory of page {len(pages) - 1} is cut off at the end of the file ({size} bytes)"
    next_ifd = struct.unpack(fmt.offsetformat, raw)[0]
    if next_ifd != 0:
        return (
            f"directory chain broken after page {len(pages) - 1} (next directory at byte {next_ifd}, file has {size})"
        )
    return None


def open_raw_tiles(path: str | os.PathLike[str], level_dimensions: Sequence[tuple[int, int]]) -> RawTileSource:
    """A RawTileSource for `path`; one with no layouts when the file is not a TIFF tifffile can parse."""
    return RawTileSource(os.fspath(path), level_dimensions)
