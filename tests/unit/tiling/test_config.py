"""Tiling settings that cannot tile anything are refused when the config is loaded (issue 10.8)."""

from __future__ import annotations

import pytest

from gpfm_scale.config import build_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling.config import MAX_TILE_PX, TilingConfig


@pytest.mark.parametrize("data,match", [
    ({"readers": []}, "readers"),
    ({"readers": ["cucim", "cucim"]}, "repeat"),
    ({"readers": ["pillow"]}, "readers"),
    ({"grid": {"tile_px": 100_000}}, "tile_px 100000 is larger"),
    ({"grid": {"tile_px": 256, "stride_px": MAX_TILE_PX + 1}}, "stride_px"),
    ({"grid": {"tile_px": 512, "stride_px": 8}}, "overlap"),
])
def test_unusable_settings_are_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        build_config(TilingConfig, data)


def test_usable_bounds_are_accepted():
    cfg = build_config(TilingConfig, {"grid": {"tile_px": MAX_TILE_PX, "stride_px": MAX_TILE_PX // 16},
                                      "readers": ["tiffslide"]})
    assert cfg.grid.tile_px == MAX_TILE_PX
