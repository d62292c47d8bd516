"""The embedding config holds its driver settings once; the tiling of a slide manifest runs under them (issue 11.2)."""

from __future__ import annotations

import pytest

from gpfm_scale.cli import config_defaults, main
from gpfm_scale.config import load_config
from gpfm_scale.embed_command import EmbedCommandConfig


def test_ray_address_and_metrics_port_are_keys_once():
    keys = list(config_defaults("embed"))
    for name in ("ray_address", "metrics_port", "metrics_host", "resources_timeout_s"):
        assert [k for k in keys if k.rsplit(".", 1)[-1] == name] == [name]


def test_the_tiling_of_a_manifest_runs_under_the_embed_runs_driver_settings():
    cfg = load_config(EmbedCommandConfig, None, {"ray_address": "10.0.0.1:6379", "resources_timeout_s": 60,
                                          "metrics_port": 9100, "tiling.grid.tile_px": 256})
    tiling = cfg.tiling_config()
    assert (tiling.ray_address, tiling.resources_timeout_s, tiling.grid.tile_px) == ("10.0.0.1:6379", 60.0, 256)
    assert tiling.metrics_port is None  # the embed run's endpoint already serves the tiling counters


@pytest.mark.parametrize("key", ["ray_address", "metrics_port"])
def test_the_old_tiling_copy_is_refused_naming_the_key_to_set(capsys, key):
    assert main(["embed", "--set", f"tiling.{key}=1", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"'tiling.{key}' was removed: set '{key}'" in err and "\n" not in err, err
