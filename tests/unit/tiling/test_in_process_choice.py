"""Which runs tile in the command's own process (`tiling.in_process`, issue 13.11): auto only where Ray would
start a one-actor local instance of its own."""

from __future__ import annotations

import sys

import pytest

from gpfm_scale.config import build_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.local import runs_in_process


@pytest.fixture
def no_ray_session(monkeypatch):
    """This process as a fresh CLI run sees it: no address in the environment, no Ray session (another test of the
    same pytest run may have one up)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)


@pytest.mark.parametrize("settings,n_todo,expected", [
    ({}, 1, True),  # one slide: one actor whatever the CPUs
    ({}, 3, False),  # unset workers: as many actors as CPUs
    ({"workers": 1}, 3, True),
    ({"workers": 2}, 3, False),
    ({"workers": 1, "ray_address": "10.0.0.1:6379"}, 3, False),
    ({"workers": 1, "gpus_per_worker": 1}, 3, False),
    ({"workers": 1, "actor_resources": {"tiling": 1}}, 3, False),
    ({"workers": 1, "in_process": "never"}, 3, False),
    ({"in_process": "always", "ray_address": "10.0.0.1:6379"}, 3, True),
])
def test_auto_runs_in_process_only_for_one_local_worker(no_ray_session, settings, n_todo, expected):
    assert runs_in_process(build_config(TilingConfig, settings), n_todo) is expected


def test_ray_address_in_the_environment_means_actors(no_ray_session, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # what `ray job submit` sets
    assert not runs_in_process(build_config(TilingConfig, {"workers": 1}), 1)


def test_always_with_several_workers_is_refused():
    with pytest.raises(ConfigError, match="in_process 'always' runs one worker"):
        build_config(TilingConfig, {"in_process": "always", "workers": 2})
