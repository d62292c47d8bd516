"""Decoding stored tiles once gives exactly the readers' pixels, at every level, across tile seams and edges."""

import numpy as np
import pytest

from gpfm_scale.slides.config import GridConfig
from gpfm_scale.slides.grid import plan_grid
from gpfm_scale.slides.open import open_slide
from gpfm_scale.slides.synthetic import write_synthetic_slide
from gpfm_scale.tiling.regions import _library_regions, grid_regions


def _grid(reader, **cfg):
    mask = np.ones((64, 64), bool)
    ds = reader.level_dimensions[0][0] / 64
    return plan_grid(reader.level_dimensions, reader.level_downsamples, reader.mpp,
                     GridConfig(min_tissue_fraction=0, max_tiles_per_slide=None, **cfg), mask, ds, "s")


@pytest.mark.parametrize("cfg", [
    {"tile_px": 224},                                     # level 0, windows straddle 256-px stored tiles
    {"tile_px": 100, "target_mpp": 1.0},                  # level 1 (4x), no resize
    {"tile_px": 96, "stride_px": 80, "edge": "pad"},      # overlap, and windows past the edge (white)
])
def test_banded_decode_equals_the_reader(tmp_path, cfg):
    write_synthetic_slide(tmp_path / "s.svs", 1100, 900, tile=256, levels=2, seed=3)
    with open_slide(str(tmp_path / "s.svs")) as reader:
        grid = _grid(reader, **cfg)
        assert reader.raw_tile_layout(grid.read_level) is not None
        size = (grid.read_size_px, grid.read_size_px)
        for (x, y), region in zip(grid.coords.tolist(), grid_regions(reader, grid)):
            np.testing.assert_array_equal(region, reader.read_region((x, y), grid.read_level, size))


def test_real_svs_banded_equals_library(real_svs):
    with open_slide(str(real_svs)) as reader:
        grid = _grid(reader, tile_px=224)
        for a, b in zip(grid_regions(reader, grid), _library_regions(reader, grid, 16)):
            np.testing.assert_array_equal(a, b)
