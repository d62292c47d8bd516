"""The slide-reader interface every backend implements (`open_slide` in `slides/open.py` picks one).

Backends (cuCIM, OpenSlide, tiffslide) register in `SLIDE_READERS`; `open_slide` tries them in the configured
order and records which one opened the slide, so the run manifest can say how every tile was read.
Coordinates are level-0 pixels (x right, y down), as OpenSlide, CLAM and TRIDENT use.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from gpfm_scale.registry import Registry

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
"""File suffixes taken for whole-slide images when a folder or glob is listed (tiling's --slides, embed's --input)."""

@dataclass(frozen=True)
class RawTileLayout:
    """Geometry of a level's own compressed tiles, for the zero-decode path.

    tile_width/tile_height: stored tile size in pixels; compression: 'jpeg' (the only one copied without decoding).
    """

    level: int
    tile_width: int
    tile_height: int
    compression: str


class SlideReader(abc.ABC):
    """An open whole-slide image. Levels are ordered from full resolution (0) to smallest."""

    name: str = "abstract"

    @property
    @abc.abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) in pixels of each level."""

    @property
    @abc.abstractmethod
    def level_downsamples(self) -> list[float]:
        """Downsample factor of each level relative to level 0."""

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    @abc.abstractmethod
    def mpp(self) -> float | None:
        """Microns per level-0 pixel from the slide's own metadata, or None when the slide does not say."""

    @property
    @abc.abstractmethod
    def magnification(self) -> float | None:
        """Objective power from metadata (Aperio AppMag, openslide.objective-power), or None."""

    @abc.abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [H, W, 3] of `size` (w, h) at `level`, top-left at level-0 `location` (x, y).

        Pixels outside the slide come back white (255), like OpenSlide's transparent background composited on white.
        """

    def read_regions(
        self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int], batch_size: int = 32
    ) -> Iterator[np.ndarray]:
        """Yield one owned (copied) RGB uint8 [H, W, 3] array per location, in order. Backends batch when they can."""
        for loc in locations:
            yield self.read_region(loc, level, size)

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one (small) level as RGB uint8 [H, W, 3]; used for tissue masks and thumbnails."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def raw_tile_layout(self, level: int) -> RawTileLayout | None:
        """The stored tile geometry of `level` when its tiles can be copied as standalone JPEGs, else None."""
        return None

    def read_raw_tile(self, level: int, col: int, row: int) -> bytes:
        """The stored tile (col, row) of `level` as a complete, standalone JPEG byte string (no decode)."""
        raise NotImplementedError(f"{self.name} cannot copy raw tiles")

    def close(self) -> None:
        """Release file handles; the reader is unusable afterwards."""

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SLIDE_READERS: Registry[type[SlideReader]] = Registry("slide reader")
