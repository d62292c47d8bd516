"""Tile grids: hand-computed coordinates, resampling levels, tissue fractions, the cap, edges and zero-decode."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from gpfm_scale.config import build_config
from gpfm_scale.errors import ConfigError, SlideReadError
from gpfm_scale.slides.config import GridConfig
from gpfm_scale.slides.grid import (
    TileGrid,
    plan_grid,
    raw_tile_index,
    stable_hash,
    within_level,
    zero_decode_compatible,
)
from gpfm_scale.slides.reader import RawTileLayout

PYRAMID = dict(level_dimensions=[(4000, 4000), (1000, 1000), (250, 250)], level_downsamples=[1.0, 4.0, 16.0])


def _full_mask(w: int, h: int) -> np.ndarray:
    return np.ones((h, w), dtype=bool)


def _plan(dims: tuple[int, int], mpp0: float = 0.25, slide_id: str = "s", **grid: object) -> TileGrid:
    """Single-level slide of `dims` (w, h), all tissue, mask at level-0 resolution; edge 'drop' unless given."""
    cfg = GridConfig(**{"min_tissue_fraction": 0.0, "max_tiles_per_slide": None, "edge": "drop", **grid})
    return plan_grid([dims], [1.0], mpp0, cfg, _full_mask(*dims), 1.0, slide_id)


def _pyramid(target_mpp: float | None = None, **grid: object) -> TileGrid:
    cfg = GridConfig(**{"tile_px": 256, "target_mpp": target_mpp, "min_tissue_fraction": 0.0,
                        "max_tiles_per_slide": None, "edge": "drop", **grid})
    return plan_grid(**PYRAMID, mpp0=0.25, cfg=cfg, mask=_full_mask(1000, 1000), mask_downsample=4.0, slide_id="p")


def test_hand_computed_drop() -> None:
    grid = _plan((1000, 700), tile_px=256)
    expected = [(0, 0), (256, 0), (512, 0), (0, 256), (256, 256), (512, 256)]
    assert grid.coords.tolist() == [list(c) for c in expected]
    assert grid.coords.dtype == np.int64 and grid.tissue_fraction.dtype == np.float32
    assert np.all(grid.tissue_fraction == 1.0)
    assert (grid.read_level, grid.read_size_px, grid.needs_resize) == (0, 256, False)
    assert grid.tile_size_level0 == 256 and grid.stride_level0 == 256
    assert grid.target_mpp == 0.25 and grid.magnification == pytest.approx(40.0)
    assert grid.num_positions == 6 and len(grid) == 6


def test_pad_keeps_edge_tiles_and_counts_outside_as_background() -> None:
    grid = _plan((1000, 700), tile_px=256, edge="pad")
    xs, ys = [0, 256, 512, 768], [0, 256, 512]
    assert grid.coords.tolist() == [[x, y] for y in ys for x in xs]
    corner = grid.tissue_fraction[-1]
    assert corner == pytest.approx((1000 - 768) * (700 - 512) / 256**2)
    # right column is 232/256 = 0.91 inside, bottom row 188/256 = 0.73: a 0.75 threshold drops the bottom row only
    kept = _plan((1000, 700), tile_px=256, edge="pad", min_tissue_fraction=0.75)
    assert kept.coords.tolist() == [[x, y] for y in ys[:2] for x in xs]
    assert kept.num_positions == 12 and kept.num_tissue == 8


def test_overlap() -> None:
    grid = _plan((1000, 700), tile_px=256, stride_px=128)
    assert sorted(set(grid.coords[:, 0].tolist())) == [0, 128, 256, 384, 512, 640]  # 640 + 256 <= 1000 < 768 + 256
    assert sorted(set(grid.coords[:, 1].tolist())) == [0, 128, 256, 384]
    assert len(grid) == 24 and grid.stride_level0 == 128


@pytest.mark.parametrize(
    ("target", "level", "read_size", "tile0", "resize"),
    [
        (0.5, 0, 512, 512, True),  # finer level read at 2x, resized down
        (1.0, 1, 256, 1024, False),  # exact level
        (2.0, 1, 512, 2048, True),
        (4.0, 2, 256, 4096, False),
        (0.24, 0, 256, 256, False),  # within the 10% tolerance of level 0: read as is
        (1.05, 1, 256, 1024, False),
    ],
)
def test_resampling_level_and_read_size(target: float, level: int, read_size: int, tile0: int, resize: bool) -> None:
    grid = _pyramid(target)
    assert (grid.read_level, grid.read_size_px, grid.needs_resize) == (level, read_size, resize)
    assert grid.tile_size_level0 == tile0
    expected_mpp = 0.25 * PYRAMID["level_downsamples"][level] * read_size / 256
    assert grid.target_mpp == pytest.approx(expected_mpp)
    assert grid.magnification == pytest.approx(10.0 / expected_mpp)
    assert len(grid) == (4000 // tile0) ** 2
    assert np.all(grid.coords % tile0 == 0)


def test_target_magnification_and_upsampling_error() -> None:
    cfg = GridConfig(tile_px=256, target_magnification=10, min_tissue_fraction=0.0)
    grid = plan_grid(**PYRAMID, mpp0=0.25, cfg=cfg, mask=_full_mask(1000, 1000), mask_downsample=4.0, slide_id="m")
    assert grid.read_level == 1 and grid.target_mpp == 1.0
    with pytest.raises(SlideReadError, match="upsampling"):
        _pyramid(0.1)
    with pytest.raises(SlideReadError, match="mpp"):
        _plan((1000, 700), mpp0=0.0)


def test_tissue_fraction_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((80, 110)) < 0.4
    ds = 3.7
    cfg = GridConfig(tile_px=64, stride_px=48, edge="pad", min_tissue_fraction=0.0, max_tiles_per_slide=None)
    grid = plan_grid([(400, 300)], [1.0], 0.5, cfg, mask, ds, "r")
    for (x, y), frac in zip(grid.coords.tolist(), grid.tissue_fraction.tolist(), strict=True):
        x0, y0 = int(np.floor(x / ds + 0.5)), int(np.floor(y / ds + 0.5))
        x1 = max(x0 + 1, int(np.floor((x + 64) / ds + 0.5)))
        y1 = max(y0 + 1, int(np.floor((y + 64) / ds + 0.5)))
        assert frac == pytest.approx(mask[y0:y1, x0:x1].sum() / ((x1 - x0) * (y1 - y0)), abs=1e-6)


def test_tissue_filter_on_half_mask() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[:, :50] = True  # left half of a 1000 x 1000 slide (mask downsample 10)
    cfg = GridConfig(tile_px=100, min_tissue_fraction=0.5, max_tiles_per_slide=None)
    grid = plan_grid([(1000, 1000)], [1.0], 0.5, cfg, mask, 10.0, "h")
    assert len(grid) == 50 and grid.num_positions == 100 and grid.num_tissue == 50
    assert grid.coords[:, 0].max() == 400 and np.all(grid.tissue_fraction == 1.0)


def _capped(slide_id: str, seed: int = 0) -> TileGrid:
    cfg = GridConfig(tile_px=64, min_tissue_fraction=0.0, max_tiles_per_slide=50, seed=seed)
    return plan_grid([(6400, 6400)], [1.0], 0.5, cfg, _full_mask(100, 100), 64.0, slide_id)


def test_cap_is_deterministic_per_slide_and_sorted() -> None:
    a, b = _capped("slide-a"), _capped("slide-a")
    assert len(a) == 50 and a.num_tissue == 10_000
    assert np.array_equal(a.coords, b.coords)
    assert not np.array_equal(a.coords, _capped("slide-b").coords)
    assert not np.array_equal(a.coords, _capped("slide-a", seed=1).coords)
    order = np.lexsort((a.coords[:, 0], a.coords[:, 1]))
    assert np.array_equal(order, np.arange(50))
    assert len({tuple(c) for c in a.coords.tolist()}) == 50
    assert np.all(a.coords % 64 == 0)


def test_stable_hash_is_the_same_in_another_process() -> None:
    code = "from gpfm_scale.slides.grid import stable_hash; print(stable_hash('TCGA-01/slide.svs'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert int(out.stdout.strip()) == stable_hash("TCGA-01/slide.svs")
    assert 0 <= stable_hash("x") < 2**64 and stable_hash("x") != stable_hash("y")


def test_zero_decode_native_grid() -> None:
    grid = _plan((1024, 768), tile_px=256)
    layout = RawTileLayout(level=0, tile_width=256, tile_height=256, compression="jpeg")
    assert zero_decode_compatible(grid, layout)
    cols, rows = raw_tile_index(grid.coords, grid, layout)
    assert cols.tolist() == [0, 1, 2, 3] * 3 and rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert zero_decode_compatible(_plan((1024, 768), tile_px=256, edge="pad"), layout)  # nothing runs past


def test_default_pads_edges_and_drop_records_the_untiled_tissue() -> None:
    """CLAM's default: the partial last column/row is tiled (white outside); 'drop' says what it leaves out."""
    assert GridConfig().edge == "pad"
    cfg = GridConfig(tile_px=256, min_tissue_fraction=0.0, max_tiles_per_slide=None)
    padded = plan_grid([(1000, 700)], [1.0], 0.25, cfg, _full_mask(1000, 700), 1.0, "s")
    assert len(padded) == 4 * 3 and padded.untiled_tissue_fraction == 0.0
    assert np.all(padded.coords < [1000, 700])  # every tile starts inside the slide
    dropped = _plan((1000, 700), tile_px=256)
    # tiled: [0, 768) x [0, 512) of a 1000 x 700 all-tissue slide
    assert dropped.untiled_tissue_fraction == pytest.approx(1 - 768 * 512 / (1000 * 700))
    mask = np.zeros((700, 1000), dtype=bool)
    mask[100:300, 100:500] = True  # tissue only inside the tiled part
    inner = plan_grid([(1000, 700)], [1.0], 0.25, GridConfig(tile_px=256, edge="drop"), mask, 1.0, "s")
    assert inner.untiled_tissue_fraction == 0.0
    blank = plan_grid([(1000, 700)], [1.0], 0.25, GridConfig(tile_px=256, edge="drop"), mask & False, 1.0, "s")
    assert blank.untiled_tissue_fraction == 0.0


def test_zero_decode_with_padded_edges_copies_the_inner_tiles() -> None:
    grid = _plan((1000, 700), tile_px=256, edge="pad")
    layout = RawTileLayout(level=0, tile_width=256, tile_height=256, compression="jpeg")
    assert zero_decode_compatible(grid, layout)
    inside = within_level(grid)
    # 4 x 3 grid: the right column (x=768) and bottom row (y=512) run past the 1000 x 700 level
    assert inside.tolist() == [True, True, True, False] * 2 + [False] * 4
    assert within_level(_plan((1024, 768), tile_px=256, edge="pad")).all()


@pytest.mark.parametrize(
    ("grid_kwargs", "layout_kwargs"),
    [
        ({}, {"tile_width": 240, "tile_height": 240}),
        ({}, {"tile_height": 512}),
        ({}, {"compression": "lzw"}),
        ({}, {"level": 1}),
        ({"stride_px": 128}, {}),
        ({"target_mpp": 0.5}, {}),
    ],
)
def test_zero_decode_incompatible(grid_kwargs: dict, layout_kwargs: dict) -> None:
    grid_kwargs = dict(grid_kwargs)
    dims = grid_kwargs.pop("dims", (1024, 768))
    grid = _plan(dims, tile_px=256, **grid_kwargs)
    base = {"level": 0, "tile_width": 256, "tile_height": 256, "compression": "jpeg"}
    layout = RawTileLayout(**{**base, **layout_kwargs})
    assert not zero_decode_compatible(grid, layout)
    assert not zero_decode_compatible(grid, None)


def test_zero_decode_on_a_lower_level_with_fractional_downsample() -> None:
    ds = 4001 / 1000
    cfg = GridConfig(tile_px=256, target_mpp=1.0, min_tissue_fraction=0.0, max_tiles_per_slide=None, edge="drop")
    grid = plan_grid([(4001, 3001), (1000, 750)], [1.0, ds], 0.25, cfg, _full_mask(100, 75), 40.01, "f")
    layout = RawTileLayout(level=1, tile_width=256, tile_height=256, compression="jpeg")
    assert grid.read_level == 1 and not grid.needs_resize and len(grid) == 3 * 2
    assert zero_decode_compatible(grid, layout)
    cols, rows = raw_tile_index(grid.coords, grid, layout)
    assert cols.tolist() == [0, 1, 2, 0, 1, 2] and rows.tolist() == [0, 0, 0, 1, 1, 1]
    assert grid.coords[:3, 0].tolist() == [0, round(256 * ds), round(512 * ds)]
    with pytest.raises(ValueError, match="off the stored tile grid"):
        raw_tile_index(np.array([[100, 0]]), grid, layout)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="not both"):
        build_config(GridConfig, {"target_mpp": 0.5, "target_magnification": 20})
    with pytest.raises(ConfigError, match="tile_px"):
        build_config(GridConfig, {"tile_px": 0})
    with pytest.raises(ConfigError, match="edge"):
        build_config(GridConfig, {"edge": "wrap"})
    assert GridConfig().effective_stride_px == 512 and GridConfig(target_magnification=20).requested_mpp == 0.5
