"""A tiling run interrupted (driver or actor killed) and rerun yields exactly the tiles of an uninterrupted run.

Each kill lands at an exact point of the run, chosen by the run's own events (not after a guessed delay): the
driver kills itself right after its 2nd commit (the stage's `on_commit` hook), and one actor process kills itself
right after publishing a shard that the driver has not committed yet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpfm_scale.config import build_config
from gpfm_scale.contracts.run_manifest import read_state
from gpfm_scale.tiling import stage
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.slide_job import SlideTask
from gpfm_scale.tiling.worker import TileWorker
from tests.integration.tiling_helpers import make_cohort, tile_set

pytestmark = pytest.mark.usefixtures("ray_session")

# Small shards: a shard is sealed at the first slide boundary (a commit per shard; 5 of the 8 slides have tissue).
SETTINGS = {"grid": {"tile_px": 128, "max_tiles_per_slide": 60, "min_tissue_fraction": 0.1}, "workers": 2,
            "shard_max_bytes": 1}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), 8)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = stage.run(build_config(TilingConfig, SETTINGS), str(cohort), str(out))
    assert result.ok and result.n_done == 8 and len(result.no_tiles) == 3
    return tile_set(out)


def _committed(out: Path) -> set[str]:
    """The committed shards in the durable state (manifest.parquet + journal: the parquet alone lags until
    compaction); each commit is one shard, of one slide or more."""
    state = read_state(str(out))
    return set() if state is None else {s for shards in state.loc[state["status"] == "done", "shards"] for s in shards}


def test_driver_killed_at_its_second_commit_then_rerun(cohort, reference, tmp_path, ray_session):
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    killed = subprocess.run([sys.executable, "-m", "tests.integration.tiling_kill_driver", str(cohort), str(tmp_path),
                             "2", json.dumps(SETTINGS)], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(_committed(tmp_path)) == 2  # both commits are durable, and no commit after them happened
    cmd = [sys.executable, "-m", "gpfm_scale.cli", "tile", "--slides", str(cohort), "--out", str(tmp_path),
           "--workers", "2", "--tile-px", "128", "--max-tiles", "60", "--min-tissue", "0.1",
           "--set", "shard_max_bytes=1", "--log-level", "WARNING"]
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _committed(tmp_path) == {p.name for p in (tmp_path / "shards").glob("*.tar")}
    assert tile_set(tmp_path) == reference


def _once(marker: Path | None) -> type[TileWorker]:
    """The real tiling actor with `first()`: True for the one caller in the whole run (processes and restarts
    included) that creates `marker`; always True without one. Made here, not imported: Ray ships it by value."""

    class Once(TileWorker):
        def first(self) -> bool:
            if marker is None:
                return True
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
            return True

    return Once


def _dies_after_publishing(marker: Path) -> type[TileWorker]:
    """The real tiling actor, except that the first of its processes to publish a shard SIGKILLs itself before
    returning it: that shard is on disk under a reserved name but never committed, and the slides it holds are
    lost with the process. `marker`, created exclusively, makes it one death in the whole run, restarts included."""

    class DiesAfterPublishing(_once(marker)):
        def process(self, task: SlideTask, shard_name: str):
            outcome, sealed, token = super().process(task, shard_name)
            if sealed is not None and self.first():
                os.kill(os.getpid(), signal.SIGKILL)
            return outcome, sealed, token

    return DiesAfterPublishing


def test_actor_killed_after_publishing_is_recovered(cohort, reference, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setattr(stage, "TileWorker", _dies_after_publishing(marker))
    commits: list[str] = []
    result = stage.run(build_config(TilingConfig, SETTINGS), str(cohort), str(tmp_path / "out"),
                       on_commit=lambda sealed: commits.append(sealed.name))
    assert marker.exists() and result.worker_restarts == 1
    assert result.ok and result.n_done == 8
    assert tile_set(tmp_path / "out") == reference  # the uncommitted shard was swept: no tile twice, none lost
    # the hook saw each commit once, and only commits: the published-but-uncommitted shard is not among them
    assert sorted(commits) == sorted(_committed(tmp_path / "out"))
    assert set(commits) == {p.name for p in (tmp_path / "out" / "shards").glob("*.tar")}


def _dies_on(slide_id: str, marker: Path | None) -> type[TileWorker]:
    """The real tiling actor, except that its process SIGKILLs itself on `slide_id` after tiling it (as a slide
    that exhausts memory would): once in the whole run when `marker` is given (it is created exclusively), else
    every time (a slide that kills every process). The slide before it has answered by then: the driver can tell
    which slide the process died on."""

    class DiesOn(_once(marker)):
        def process(self, task: SlideTask, shard_name: str):
            result = super().process(task, shard_name)
            if task.slide_id == slide_id and self.first():
                os.kill(os.getpid(), signal.SIGKILL)
            return result

    return DiesOn


# One actor with 4 slides queued on it: one death fails all 4, and the driver re-sends them at once.
CROWDED = {**SETTINGS, "workers": 1, "max_inflight_per_worker": 4}


def test_one_death_with_many_tasks_in_flight_is_counted_once(cohort, reference, tmp_path, monkeypatch):
    """Every task that reached the dead process fails with it; it is still one death, charged to no slide twice:
    at the default budget of 2 deaths per slide, none fails."""
    marker = tmp_path / "died"
    monkeypatch.setattr(stage, "TileWorker", _dies_on("s01", marker))
    result = stage.run(build_config(TilingConfig, CROWDED), str(cohort), str(tmp_path / "out"))
    assert marker.exists() and result.worker_restarts == 1
    assert result.ok and result.n_done == 8
    assert tile_set(tmp_path / "out") == reference


def test_a_slide_that_kills_every_process_fails_after_the_death_budget(cohort, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "TileWorker", _dies_on("s01", None))
    result = stage.run(build_config(TilingConfig, CROWDED), str(cohort), str(tmp_path / "out"))
    assert result.worker_restarts == 2  # the default max_worker_deaths_per_slide
    assert [sid for sid, _ in result.failed] == ["s01"] and "died 2 times" in result.failed[0][1]
    assert result.n_done == 7
