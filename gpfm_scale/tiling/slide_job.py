"""Tile one slide into an open shard: the unit of work of a tiling actor, free of Ray so it can run anywhere.

Steps: stage a local copy (remote URLs) -> open with the first reader that works -> resolve MPP -> tissue mask on a
low-resolution level -> plan the grid -> write tiles (copying the slide's own JPEG tiles when the grid coincides
with them, else read, resize and encode) -> per-slide coordinates (.h5) and QC thumbnail. Any error rolls the
shard back to the slide's start, so a failed slide leaves no tile behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator

import cv2
import numpy as np
import simplejpeg

from gpfm_scale.contracts.coords import coords_parts, write_coords
from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.shards import META_EXT, ShardWriter, sample_key
from gpfm_scale.errors import GpfmError, SlideReadError
from gpfm_scale.slides.grid import TileGrid, plan_grid, raw_tile_index, within_level, zero_decode_compatible
from gpfm_scale.slides.mpp import magnification_from_mpp, resolve_mpp
from gpfm_scale.slides.open import open_slide
from gpfm_scale.slides.qc import render_thumbnail, save_png
from gpfm_scale.slides.reader import SlideReader
from gpfm_scale.slides.staging import local_copy
from gpfm_scale.slides.tissue import choose_mask_level, mask_from_level, mask_width
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.manifest import SlideOutcome
from gpfm_scale.tiling.regions import grid_regions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideTask:
    slide_id: str
    path: str
    manifest_mpp: float | None = None


def encode_tile(rgb: np.ndarray, cfg: TilingConfig) -> tuple[str, bytes]:
    """(extension, bytes) of one RGB uint8 tile in the configured encoding."""
    if cfg.encoding == "png":
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise GpfmError("PNG encode failed")
        return "png", buf.tobytes()
    return "jpg", simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=cfg.jpeg_quality, colorspace="RGB",
                                         colorsubsampling="420")


def _decoded_tiles(reader: SlideReader, grid: TileGrid, tile_px: int, cfg: TilingConfig) -> Iterator[tuple[str, bytes]]:
    for region in grid_regions(reader, grid, cfg.read_batch_size):
        if grid.needs_resize:
            region = cv2.resize(region, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        yield encode_tile(region, cfg)


def _raw_tiles(reader: SlideReader, grid: TileGrid, layout: Any, cfg: TilingConfig) -> Iterator[tuple[str, bytes]]:
    """The stored JPEG tiles of the grid, in grid order; edge tiles that run past the level (edge 'pad') are read
    through the reader (white outside) and encoded, since a stored edge tile holds undefined pixels there."""
    inside = within_level(grid)
    cols, rows = raw_tile_index(grid.coords[inside], grid, layout)
    stored = (("jpg", reader.read_raw_tile(grid.read_level, c, r)) for c, r in zip(cols.tolist(), rows.tolist()))
    edges = _decoded_tiles(reader, replace(grid, coords=grid.coords[~inside],
                                           tissue_fraction=grid.tissue_fraction[~inside]), cfg.grid.tile_px, cfg)
    for ok in inside.tolist():
        yield next(stored) if ok else next(edges)


def write_coords_h5(path: str, slide_id: str, grid: TileGrid, tile_px: int, mpp0: float) -> None:
    """The slide's coordinates file (`contracts.coords`: CLAM/TRIDENT layout), its geometry from the grid."""
    write_coords(path, grid.coords, grid.tissue_fraction, {
        "name": slide_id,
        "patch_size": tile_px,
        "patch_size_level0": int(round(grid.tile_size_level0)),
        "patch_level": grid.read_level,
        "level0_mpp": mpp0,
        "level0_magnification": magnification_from_mpp(mpp0),
        "target_mpp": grid.target_mpp,
        "target_magnification": grid.magnification,
        "overlap": int(round(grid.tile_size_level0 - grid.stride_level0)),
    })


def _publish_side_files(out: OutputDir, slide_id: str, grid: TileGrid, cfg: TilingConfig, mpp0: float,
                        thumb: tuple[np.ndarray, np.ndarray, float] | None) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".h5", dir=out.local_tmp_dir())
    os.close(fd)
    write_coords_h5(tmp, slide_id, grid, cfg.grid.tile_px, mpp0)
    out.publish(tmp, *coords_parts(slide_id))
    if thumb is not None:
        image, mask, downsample = thumb
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.local_tmp_dir())
        os.close(fd)
        save_png(tmp, render_thumbnail(image, mask, grid, downsample))
        out.publish(tmp, "thumbnails", f"{slide_id}.png")


def _why_no_tiles(grid: TileGrid, mask: np.ndarray, cfg: TilingConfig) -> str:
    """The reason recorded on a slide that is done with 0 tiles (kept apart from failures: nothing went wrong)."""
    if grid.num_positions == 0:
        w, h = grid.read_level_size
        return (f"no tiles: a {grid.read_size_px}-px read ({cfg.grid.tile_px}-px tile at {grid.target_mpp:g} µm/px) "
                f"does not fit in the {w}x{h} level")
    if not mask.any():
        return "no tiles: no tissue found"
    return f"no tiles: none of {grid.num_positions} positions is at least {cfg.grid.min_tissue_fraction:g} tissue"


def tile_slide(task: SlideTask, cfg: TilingConfig, writer: ShardWriter, out: OutputDir,
               device: str = "cpu") -> SlideOutcome:
    """Tile one slide into `writer` (committed by the caller). Never raises for a bad slide: returns ok=False."""
    start = time.perf_counter()
    outcome = SlideOutcome(slide_id=task.slide_id, ok=False)
    writer.begin_slide()
    try:
        with local_copy(task.path, cfg.staging_dir) as local_path, \
                open_slide(local_path, cfg.readers, device) as reader:
            outcome.reader = reader.name
            mpp0, outcome.mpp_source = resolve_mpp(reader.mpp, task.manifest_mpp, cfg.fallback_mpp, task.slide_id)
            mask_level = choose_mask_level(reader.level_dimensions,
                                           mask_width(reader.level_dimensions[0][0], mpp0, cfg.tissue))
            low = reader.read_level(mask_level)
            mask, mask_ds = mask_from_level(low, reader.level_downsamples[mask_level], mpp0, cfg.tissue)
            grid = plan_grid(reader.level_dimensions, reader.level_downsamples, mpp0, cfg.grid, mask, mask_ds,
                             task.slide_id)
            outcome.mpp, outcome.magnification = grid.target_mpp, grid.magnification
            outcome.untiled_tissue_fraction = round(grid.untiled_tissue_fraction, 4)
            outcome.reason = _why_no_tiles(grid, mask, cfg) if len(grid.coords) == 0 else ""
            layout = reader.raw_tile_layout(grid.read_level) if cfg.zero_decode else None
            outcome.zero_decode = bool(layout is not None and zero_decode_compatible(grid, layout))
            tiles = _raw_tiles(reader, grid, layout, cfg) if outcome.zero_decode else \
                _decoded_tiles(reader, grid, cfg.grid.tile_px, cfg)
            for i, (ext, payload) in enumerate(tiles):
                x, y = (int(v) for v in grid.coords[i])
                meta = {"slide_id": task.slide_id, "x": x, "y": y, "level": grid.read_level,
                        "tile_px": cfg.grid.tile_px, "mpp": grid.target_mpp, "magnification": grid.magnification,
                        "tissue_fraction": round(float(grid.tissue_fraction[i]), 4), "reader": reader.name}
                outcome.bytes += writer.add(sample_key(task.slide_id, x, y), {ext: payload,
                                                                             META_EXT: json.dumps(meta).encode()})
                outcome.n_tiles += 1
            if outcome.n_tiles != len(grid.coords):
                raise SlideReadError(f"reader returned {outcome.n_tiles} of {len(grid.coords)} tiles")
            thumb = (low, mask, reader.level_downsamples[mask_level]) if cfg.thumbnails else None
            _publish_side_files(out, task.slide_id, grid, cfg, mpp0, thumb)
        outcome.ok = True
    except Exception as err:  # a bad slide (or a reader bug it triggers) must not stop the run: record why
        writer.rollback_slide()
        outcome.reason = f"{type(err).__name__}: {err}".replace("\n", " ")[:500]
        outcome.n_tiles, outcome.bytes = 0, 0
        log.warning("slide %s failed: %s", task.slide_id, outcome.reason)
    outcome.seconds = time.perf_counter() - start
    return outcome
