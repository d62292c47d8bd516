"""The demo's tiles come from the one tiling config it holds: the tiler runs with it, the synthetic slides are
written in its tile size, the report's command rebuilds it, and the old copies are refused (issue 11.2)."""

from __future__ import annotations

import pytest
import tifffile

from gpfm_scale.cli import _parse_set
from gpfm_scale.config import apply_overrides, build_config
from gpfm_scale.demo.config import DemoConfig
from gpfm_scale.demo.data import write_demo_slides
from gpfm_scale.demo.report_text import tiling_sets
from gpfm_scale.demo.stages import tiling_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling.config import TilingConfig


def test_the_tiler_and_the_synthetic_slides_take_the_tile_size_of_the_tiling_config(tmp_path):
    cfg = DemoConfig(n_synthetic_slides=2, slide_width=512, slide_height=512, include_real_slide=False,
                     tiling={"grid": {"tile_px": 128}})
    grid = tiling_config(cfg).grid
    assert (grid.tile_px, grid.target_mpp, grid.max_tiles_per_slide) == (128, 0.5, 200)  # the rest: the demo's
    write_demo_slides(tmp_path, cfg)
    with tifffile.TiffFile(tmp_path / "synthetic-0.svs") as tif:
        assert (tif.pages[0].tilewidth, tif.pages[0].tilelength) == (128, 128)


def test_the_reports_tiling_command_rebuilds_the_demos_tiling():
    cfg = DemoConfig(tiling={"grid": {"max_tiles_per_slide": 40}, "encoding": "png"})
    args = tiling_sets(cfg.tiling)
    assert args[::2] == ["--set"] * (len(args) // 2)
    rebuilt = build_config(TilingConfig, apply_overrides({}, _parse_set(args[1::2])))
    assert rebuilt.model_dump(include={"grid", "encoding"}) == cfg.tiling.model_dump(include={"grid", "encoding"})


@pytest.mark.parametrize(("old", "owner"), [("tile_px", "tiling.grid.tile_px"),
                                            ("max_tiles_per_slide", "tiling.grid.max_tiles_per_slide")])
def test_the_old_copies_are_refused_naming_the_tiling_key(old, owner):
    with pytest.raises(ConfigError, match=f"'{old}' was removed: set '{owner}'"):
        build_config(DemoConfig, {old: 64})
