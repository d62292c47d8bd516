"""A tiling run interrupted (driver or actor killed) and rerun yields exactly the tiles of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpfm_scale.config import build_config
from gpfm_scale.contracts.run_manifest import read_state
from gpfm_scale.errors import GpfmError
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import run
from tests.integration.tiling_helpers import make_cohort, tile_set

pytestmark = pytest.mark.usefixtures("ray_session")

# Small shards (one slide each) so commits happen while the run goes on.
SETTINGS = {"grid": {"tile_px": 128, "max_tiles_per_slide": 60, "min_tissue_fraction": 0.1}, "workers": 2,
            "shard_max_bytes": 1}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), 8)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = run(build_config(TilingConfig, SETTINGS), str(cohort), str(out))
    assert result.ok and result.n_done == 8
    return tile_set(out)


def _done(out: Path) -> int:
    """Done slides in the live state (manifest.parquet + journal: the parquet alone lags until compaction)."""
    try:
        state = read_state(str(out))
    except (OSError, ValueError, GpfmError):  # a manifest or journal segment being written right now
        return 0
    return 0 if state is None else int((state["status"] == "done").sum())


def test_driver_killed_midway_then_rerun(cohort, reference, tmp_path, ray_session):
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "gpfm_scale.cli", "tile", "--slides", str(cohort), "--out", str(tmp_path),
           "--workers", "2", "--tile-px", "128", "--max-tiles", "60", "--min-tissue", "0.1",
           "--set", "shard_max_bytes=1", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while _done(tmp_path) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = _done(tmp_path)
    assert 2 <= interrupted < 8
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert tile_set(tmp_path) == reference


def test_actor_killed_midway_is_recovered(cohort, reference, tmp_path, ray_session):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=run(build_config(TilingConfig, SETTINGS), str(cohort),
                                                                  str(tmp_path))))
    thread.start()
    deadline = time.time() + 120
    while _done(tmp_path) < 1 and time.time() < deadline:
        time.sleep(0.02)
    killed = False
    for name in ray_session.util.list_named_actors():
        if name.startswith("gpfm-tiling-"):
            os.kill(ray_session.get(ray_session.get_actor(name).pid.remote()), signal.SIGKILL)
            killed = True
            break
    thread.join(timeout=300)
    assert killed and not thread.is_alive()
    assert result["r"].worker_restarts >= 1 and result["r"].ok
    assert tile_set(tmp_path) == reference
