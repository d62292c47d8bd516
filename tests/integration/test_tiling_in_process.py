"""A one-worker local tiling run in the command's own process (`tiling/local.py`): the same output as the Ray
path, chosen only where Ray would start a one-actor local instance, and no Ray session at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from gpfm_scale.config import build_config
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.local import runs_in_process
from gpfm_scale.tiling.stage import run
from tests.integration.scrape_helpers import scrape
from tests.integration.tiling_helpers import make_cohort, tile_set
from tests.ports import free_port

VOLATILE = ["seconds", "updated_at"]
"""Manifest columns that time the run: the only ones that may differ between two runs of the same input."""


def _cfg(mode: str, **settings) -> TilingConfig:
    grid = {"tile_px": 128, "max_tiles_per_slide": 40, "min_tissue_fraction": 0.25}
    return build_config(TilingConfig, {"grid": grid, "workers": 1, "encoding": "png", "shard_max_bytes": 200_000,
                                       "in_process": mode, **settings})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), 3)


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def test_in_process_run_writes_the_ray_runs_bytes(cohort, tmp_path, ray_session):
    """Same shards byte for byte (several, as the size cap splits them) and the same manifest rows. One slide in
    flight per actor: with more, a slide queued behind one that seals carries a used name and its shard stays open
    past the cap (`TileWorker.may_seal`), so the Ray path cuts shards elsewhere, with the same tiles."""
    results = {mode: run(_cfg(mode, max_inflight_per_worker=1), str(cohort), str(tmp_path / mode))
               for mode in ("always", "never")}
    assert results["always"].n_done == results["never"].n_done == 3
    local, actors = _shards(tmp_path / "always"), _shards(tmp_path / "never")
    assert len(local) > 1 and local == actors
    rows = {mode: pd.read_parquet(tmp_path / mode / "manifest.parquet").drop(columns=VOLATILE)
            for mode in results}
    pd.testing.assert_frame_equal(rows["always"], rows["never"])


def test_in_process_run_writes_the_ray_runs_tiles_with_slides_in_flight(cohort, tmp_path, ray_session):
    for mode in ("always", "never"):
        run(_cfg(mode), str(cohort), str(tmp_path / mode))
    assert tile_set(tmp_path / "always") == tile_set(tmp_path / "never") != {}


def _total(samples, name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    return found[0] if found else 0.0


def test_in_process_run_serves_its_metrics(cohort, tmp_path):
    """The run's own endpoint counts what it wrote, as on the Ray path (counters are process-wide: differences)."""
    port = free_port()
    result = run(_cfg("always", metrics_port=port), str(cohort), str(tmp_path / "a"))
    url = f"http://127.0.0.1:{port}/metrics"
    after = scrape(url)
    result2 = run(_cfg("always", metrics_port=port), str(cohort), str(tmp_path / "b"))
    again = scrape(url)
    assert result.n_tiles == result2.n_tiles > 0
    grown = {name: _total(again, name) - _total(after, name)
             for name in ("gpfm_tiling_tiles_written_total", "gpfm_tiling_written_bytes_total")}
    assert grown == {"gpfm_tiling_tiles_written_total": result2.n_tiles,
                     "gpfm_tiling_written_bytes_total": result2.n_bytes}
    assert _total(again, "gpfm_tiling_slides_total", status="done") - _total(after, "gpfm_tiling_slides_total",
                                                                              status="done") == 3


def test_auto_keeps_actors_inside_a_running_ray_session(ray_session, monkeypatch):
    """`embed` tiles inside its own Ray session: auto then uses actors there, not the driver's process."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not runs_in_process(_cfg("auto"), 1)


def test_the_cli_tiles_without_starting_ray(cohort, tmp_path):
    """`gpfm-scale tile` of one slide with no address: tiled, and this process never joined or started Ray."""
    slide = pd.read_csv(cohort)["path"][0]
    script = ("import sys; from gpfm_scale.cli import main; code = main(sys.argv[1:]); "
              "ray = sys.modules.get('ray'); print('RAY_UP', bool(ray and ray.is_initialized())); sys.exit(code)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script, "tile", "--slides", slide, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RAY_UP False" in proc.stdout
    assert "tiling in this process" in proc.stderr
    assert pd.read_parquet(tmp_path / "o" / "manifest.parquet")["status"].tolist() == ["done"]


class _Crash(Exception):
    pass


def test_a_crash_in_process_ends_the_run_and_a_rerun_resumes(cohort, tmp_path):
    """No actor to restart: the error ends the command after the first commit; the rerun keeps that shard, redoes
    only the rest, and ends with the tiles of an uninterrupted run, each once (`tile_set` fails on a duplicate)."""
    committed = []

    def crash_after_first(sealed):
        committed.append(sealed.name)
        raise _Crash(sealed.name)

    with pytest.raises(_Crash):
        run(_cfg("always"), str(cohort), str(tmp_path / "out"), on_commit=crash_after_first)
    first = (tmp_path / "out" / "shards" / committed[0]).read_bytes()
    seen = []
    rerun = run(_cfg("always"), str(cohort), str(tmp_path / "out"), on_commit=lambda s: seen.append(s.name))
    assert rerun.n_done == 3 and committed[0] not in seen
    assert (tmp_path / "out" / "shards" / committed[0]).read_bytes() == first
    run(_cfg("always"), str(cohort), str(tmp_path / "clean"))
    assert tile_set(tmp_path / "out") == tile_set(tmp_path / "clean")
