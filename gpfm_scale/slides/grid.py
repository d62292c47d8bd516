"""The tile grid of one slide, in level-0 pixel coordinates (x right, y down; origin (0, 0)), as CLAM/TRIDENT use.

`plan_grid` decides where tiles go and how to read them: which level (the coarsest one at least as fine as the
target resolution), what region size to read there (resized to `tile_px` when the level's mpp is not the target),
which positions hold enough tissue (a summed-area table of the mask, no loop over tiles), and which tiles survive
the per-slide cap (sampled reproducibly from the seed and a stable hash of the slide id). `zero_decode_compatible`
says when the planned tiles are exactly the slide's own stored JPEG tiles, so they can be copied without decoding
(all but the edge tiles that run past the level: `within_level` marks those, which are read and padded white).

Edges: with `edge: pad` (the default, as CLAM pads) the grid includes the partial last column and row, read with
white outside the slide; with `edge: drop` they are left out and `untiled_tissue_fraction` says how much of the
slide's tissue (per the mask) lies in the strips no tile covers.

Positions are laid out in read-level pixels (k * stride at that level) and converted to level 0 by the level's
downsample, rounded; so on a level whose downsample is not an integer (4.0003) tiles still fall on that level's
stored tile boundaries, and level-0 spacing may alternate by a pixel.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.config import MPP_AT_1X, GridConfig
from gpfm_scale.slides.reader import RawTileLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Where a slide's tiles are and how to read them.

    coords: (N, 2) int64 level-0 top-left (x, y), sorted by (y, x) for read locality; tissue_fraction: (N,) float32
    in [0, 1]. Read each tile as `reader.read_region(coords[i], read_level, (read_size_px, read_size_px))` and
    resize to `tile_px` when `needs_resize`. tile_size_level0 / stride_level0: footprint and step in level-0 px
    (float: exact, round for CLAM's integer `patch_size_level0`). target_mpp / magnification: the effective output
    resolution (µm/px, and MPP_AT_1X / mpp). num_positions: grid positions considered; num_tissue: those passing the
    tissue filter, before the cap. untiled_tissue_fraction: share of the mask's tissue beyond the last column/row
    of tiles (right and bottom strips; 0 with edge 'pad', 0 on a slide without tissue).
    """

    slide_id: str
    coords: np.ndarray
    tissue_fraction: np.ndarray
    read_level: int
    read_downsample: float
    read_level_size: tuple[int, int]
    read_size_px: int
    tile_px: int
    stride_px: int
    tile_size_level0: float
    stride_level0: float
    mpp0: float
    target_mpp: float
    magnification: float
    needs_resize: bool
    edge: str
    num_positions: int
    num_tissue: int
    untiled_tissue_fraction: float = 0.0

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same in every process (Python's hash() of str is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _resolve_level(
    level_downsamples: Sequence[float], mpp0: float, cfg: GridConfig, slide_id: str
) -> tuple[int, int, float]:
    """(read_level, read_size_px, effective mpp) for the configured resolution.

    The read level is the coarsest whose mpp is <= target * (1 + tolerance): at least the requested resolution,
    so output pixels come from downsampling, never upsampling. A level within the tolerance is read as is.
    """
    target = cfg.requested_mpp
    if target is None:
        return 0, cfg.tile_px, mpp0
    level_mpp = mpp0 * np.asarray(level_downsamples, dtype=np.float64)
    ok = np.flatnonzero(level_mpp <= target * (1.0 + cfg.mpp_tolerance))
    if ok.size == 0:
        raise SlideReadError(
            f"slide {slide_id}: target {target:.4g} µm/px is finer than level 0 ({mpp0:.4g} µm/px); "
            "the slide cannot provide it without upsampling"
        )
    level = int(ok[np.argmax(level_mpp[ok])])
    scale = target / level_mpp[level]
    if abs(scale - 1.0) <= cfg.mpp_tolerance:
        return level, cfg.tile_px, float(level_mpp[level])
    read_size = max(1, int(round(cfg.tile_px * scale)))
    return level, read_size, float(level_mpp[level] * read_size / cfg.tile_px)


def _axis_positions(extent: int, read_size: int, stride: float, edge: str) -> np.ndarray:
    """Tile starts along one axis in read-level px (float): all that fit ('drop') or all that start inside ('pad')."""
    if edge == "drop":
        count = int(np.floor((extent - read_size) / stride + 1e-9)) + 1 if extent >= read_size else 0
    else:
        count = int(np.ceil(extent / stride - 1e-9)) if extent > 0 else 0
    return np.arange(count, dtype=np.float64) * stride


def tissue_fractions(
    coords: np.ndarray, tile_size_level0: float, mask: np.ndarray, mask_downsample: float
) -> np.ndarray:
    """Fraction of each tile's area that is tissue, (N,) float32, from a summed-area table of `mask` [h, w] bool.

    A tile covers mask px [round(x / ds), round((x + size) / ds)) (at least one px) on each axis; the part outside
    the mask counts as background, so a padded edge tile is judged on its whole area.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    start = np.floor(coords.astype(np.float64) / mask_downsample + 0.5).astype(np.int64)
    stop = np.floor((coords.astype(np.float64) + tile_size_level0) / mask_downsample + 0.5).astype(np.int64)
    stop = np.maximum(stop, start + 1)
    area = (stop[:, 0] - start[:, 0]) * (stop[:, 1] - start[:, 1])
    x0, x1 = np.clip(start[:, 0], 0, w), np.clip(stop[:, 0], 0, w)
    y0, y1 = np.clip(start[:, 1], 0, h), np.clip(stop[:, 1], 0, h)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / area).astype(np.float32)


def untiled_tissue(
    covered_level0: tuple[float, float], mask: np.ndarray, mask_downsample: float
) -> float:
    """Share of `mask`'s tissue [h, w] bool outside [0, covered_w) x [0, covered_h) (level-0 px): the edge strips
    a 'drop' grid leaves untiled. 0 when the mask holds no tissue."""
    total = int(np.count_nonzero(mask))
    if total == 0:
        return 0.0
    w_px, h_px = (int(np.floor(v / mask_downsample + 0.5)) for v in covered_level0)
    inside = int(np.count_nonzero(mask[: max(h_px, 0), : max(w_px, 0)]))
    return float((total - inside) / total)


def _cap(num: int, cfg: GridConfig, slide_id: str) -> np.ndarray:
    """Indices (sorted) of the tiles kept by the per-slide cap; all of them when under it."""
    if cfg.max_tiles_per_slide is None or num <= cfg.max_tiles_per_slide:
        return np.arange(num)
    rng = np.random.default_rng([cfg.seed, stable_hash(slide_id)])
    return np.sort(rng.choice(num, size=cfg.max_tiles_per_slide, replace=False))


def _validate(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    mpp0: float,
    mask: np.ndarray,
    mask_downsample: float,
    slide_id: str,
) -> None:
    if not level_dimensions or len(level_dimensions) != len(level_downsamples):
        raise SlideReadError(
            f"slide {slide_id}: {len(level_dimensions)} level sizes but {len(level_downsamples)} downsamples"
        )
    if not np.isfinite(mpp0) or mpp0 <= 0:
        raise SlideReadError(f"slide {slide_id}: level-0 mpp must be a positive number of µm/px, got {mpp0}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [h, w], got shape {mask.shape}")
    if not mask_downsample > 0:
        raise ValueError(f"mask_downsample must be > 0, got {mask_downsample}")


def plan_grid(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    mpp0: float,
    cfg: GridConfig,
    mask: np.ndarray,
    mask_downsample: float,
    slide_id: str,
) -> TileGrid:
    """Plan one slide's tiles. Geometry comes from the reader, `mask` [h, w] bool from `mask_from_level`.

    mask_downsample: level-0 px per mask px. Raises SlideReadError when the slide cannot serve the target
    resolution (finer than level 0) or its metadata is inconsistent.
    """
    _validate(level_dimensions, level_downsamples, mpp0, mask, mask_downsample, slide_id)
    level, read_size, eff_mpp = _resolve_level(level_downsamples, mpp0, cfg, slide_id)
    ds = float(level_downsamples[level])
    level_w, level_h = (int(v) for v in level_dimensions[level])
    stride_read = cfg.effective_stride_px * read_size / cfg.tile_px
    xs = _axis_positions(level_w, read_size, stride_read, cfg.edge)
    ys = _axis_positions(level_h, read_size, stride_read, cfg.edge)
    gy, gx = np.meshgrid(np.rint(ys * ds), np.rint(xs * ds), indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    tile_size_level0 = read_size * ds
    mask = mask.astype(bool, copy=False)
    fraction = tissue_fractions(coords, tile_size_level0, mask, mask_downsample)
    covered = tuple(float(p[-1] * ds + tile_size_level0) if p.size else 0.0 for p in (xs, ys))
    untiled = 0.0 if cfg.edge == "pad" else untiled_tissue(covered, mask, mask_downsample)
    keep = np.flatnonzero(fraction >= cfg.min_tissue_fraction)
    chosen = keep[_cap(keep.size, cfg, slide_id)]
    coords, fraction = coords[chosen], fraction[chosen]
    coords.setflags(write=False)
    fraction.setflags(write=False)
    logger.debug(
        "slide %s: %d positions, %d with tissue, %d kept (level %d, read %d px)",
        slide_id,
        xs.size * ys.size,
        keep.size,
        len(chosen),
        level,
        read_size,
    )
    return TileGrid(
        slide_id=slide_id,
        coords=coords,
        tissue_fraction=fraction,
        read_level=level,
        read_downsample=ds,
        read_level_size=(level_w, level_h),
        read_size_px=read_size,
        tile_px=cfg.tile_px,
        stride_px=cfg.effective_stride_px,
        tile_size_level0=float(tile_size_level0),
        stride_level0=float(stride_read * ds),
        mpp0=float(mpp0),
        target_mpp=eff_mpp,
        magnification=MPP_AT_1X / eff_mpp,
        needs_resize=read_size != cfg.tile_px,
        edge=cfg.edge,
        num_positions=int(xs.size * ys.size),
        num_tissue=int(keep.size),
        untiled_tissue_fraction=untiled,
    )


def _level_offsets(coords: np.ndarray, grid: TileGrid, layout: RawTileLayout) -> tuple[np.ndarray, np.ndarray]:
    """(col_row [N, 2] int64 of the nearest stored tile, misalignment [N, 2] in read-level px)."""
    level_px = coords.astype(np.float64) / grid.read_downsample
    size = np.array([layout.tile_width, layout.tile_height], dtype=np.float64)
    col_row = np.rint(level_px / size)
    return col_row.astype(np.int64), np.abs(level_px - col_row * size)


def zero_decode_compatible(grid: TileGrid, raw_layout: RawTileLayout | None) -> bool:
    """True when every planned tile is exactly one stored JPEG tile of the read level, so it can be copied as is.

    Requires: a JPEG layout of the read level with tiles of tile_px x tile_px, no resize, stride == tile_px and
    every coordinate on a stored-tile boundary (within half a level pixel). Tiles past the level's right/bottom edge
    (edge 'pad') are the exception the caller handles: a stored edge tile holds undefined pixels there, not the
    reader's white padding, so those (`~within_level(grid)`) are read and encoded instead.
    """
    if raw_layout is None or raw_layout.compression != "jpeg" or raw_layout.level != grid.read_level:
        return False
    if (raw_layout.tile_width, raw_layout.tile_height) != (grid.tile_px, grid.tile_px):
        return False
    if grid.needs_resize or grid.read_size_px != grid.tile_px or grid.stride_px != grid.tile_px:
        return False
    if len(grid) == 0:
        return True
    _, misalignment = _level_offsets(grid.coords, grid, raw_layout)
    return not bool(np.any(misalignment > 0.5))


def within_level(grid: TileGrid) -> np.ndarray:
    """(N,) bool: the tile's read window lies inside the read level (False for padded edge tiles)."""
    start = np.rint(grid.coords.astype(np.float64) / grid.read_downsample)
    ends = start + grid.read_size_px
    return (ends[:, 0] <= grid.read_level_size[0]) & (ends[:, 1] <= grid.read_level_size[1])


def raw_tile_index(coords: np.ndarray, grid: TileGrid, layout: RawTileLayout) -> tuple[np.ndarray, np.ndarray]:
    """(cols, rows), each (N,) int64: the stored tile of `layout` that each level-0 coordinate starts.

    Raises ValueError for a coordinate that is not on a stored-tile boundary of the read level.
    """
    coords = np.asarray(coords).reshape(-1, 2)
    col_row, misalignment = _level_offsets(coords, grid, layout)
    bad = np.flatnonzero(np.any(misalignment > 0.5, axis=1))
    if bad.size:
        raise ValueError(
            f"slide {grid.slide_id}: {bad.size} coordinates off the stored tile grid, e.g. {coords[bad[0]].tolist()}"
        )
    return col_row[:, 0].copy(), col_row[:, 1].copy()
