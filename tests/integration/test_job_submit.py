"""`ray job submit` against the session's Ray head on loopback: the README's cluster commands, run for real.

Jobs go through the Job Submission API of the session instance's dashboard (tests/conftest.py), upload the
repository as their working directory (as on a cloud cluster: `--working-dir .`) and run the installed CLI. The
tile job's driver endpoint is scraped over HTTP while the job runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tests.integration.pretrain_helpers import write_tile_shards
from tests.integration.scrape_helpers import scrape
from tests.integration.tiling_helpers import make_cohort
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _env() -> dict[str, str]:
    # Ray 2.60 enables token auth on new clusters; the job client sends the token (~/.ray/auth_token, written by
    # the head) only when RAY_AUTH_MODE says so. docs/cluster.md tells users the same.
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    return env


def _submit_cmd(address: str, *entrypoint: str) -> list[str]:
    return [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entrypoint]


def _run_job(cmd: list[str], while_running: Callable[[], None] = lambda: None, timeout_s: float = 600) -> str:
    """Submit and wait (the CLI follows the job's logs), calling `while_running` every 0.2 s meanwhile. The head's
    job agent registers some seconds after the dashboard answers; until then the API says "No available agent"
    and creates no job, so that answer is retried."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None and time.monotonic() < deadline:
            while_running()
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        if "No available agent" not in out or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    import ray

    gcs = ray.get_runtime_context().gcs_address
    assert f"joining Ray cluster at {gcs}" in out, f"the job did not join this session's cluster ({gcs})"
    return out


def test_tile_job_succeeds_and_its_metrics_are_scraped_while_it_runs(ray_dashboard, tmp_path):
    cohort = make_cohort(tmp_path / "slides", 3)
    out, port = tmp_path / "tiles", free_port()
    cmd = _submit_cmd(ray_dashboard, "gpfm-scale", "tile", "--slides", str(cohort), "--out", str(out),
                      "--tile-px", "64", "--max-tiles", "40", "--workers", "2", "--metrics-port", str(port))
    seen: list[float] = []

    def scrape_tiles_written() -> None:
        try:
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
        except OSError:  # the job's driver has not started its endpoint yet, or has exited
            return
        seen.extend(s.value for s in samples.get("gpfm_tiling_tiles_written_total", []))

    _run_job(cmd, scrape_tiles_written)
    tiles = int(pd.read_parquet(out / "manifest.parquet")["n_tiles"].sum())
    assert seen, "the job's metrics endpoint never answered while it ran"
    assert seen == sorted(seen) and 0 <= seen[-1] <= tiles and tiles > 0
    assert len(list((out / "shards").glob("*.tar"))) >= 1


def test_pretrain_job_with_the_tiny_config(ray_dashboard, tmp_path):
    shards = write_tile_shards(tmp_path / "data", n_shards=2, per_shard=24)
    out = tmp_path / "run"
    cmd = _submit_cmd(ray_dashboard, "gpfm-scale", "pretrain", "--config", "gpfm_scale/configs/tiny.yaml",
                      "--shards", str(shards), "--out", str(out), "--steps", "4", "--workers", "1",
                      "--set", "run.checkpoint_every=2", "--set", "run.log_every=1")
    _run_job(cmd)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (out / "export" / "model.safetensors").is_file()


def test_a_job_with_a_relative_out_fails_in_one_line_and_writes_nothing(ray_dashboard, tmp_path):
    """Inside a submitted job a relative --out resolves in the job's temporary working directory, deleted with the
    job (issue 12.5): the stage refuses it before writing anything."""
    cohort = make_cohort(tmp_path / "slides", 1)
    cmd = _submit_cmd(ray_dashboard, "gpfm-scale", "tile", "--slides", str(cohort), "--out", "tiles-rel")
    for _ in range(60):  # the head's job agent registers some seconds after the dashboard answers (`_run_job`)
        proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=600)
        if "No available agent" not in proc.stdout:
            break
        time.sleep(2)
    assert proc.returncode != 0 and "failed" in proc.stdout, proc.stdout[-4000:]
    assert "gpfm-scale tile: error: --out 'tiles-rel' is relative, and this runs inside Ray job raysubmit_" \
        in proc.stdout, proc.stdout[-4000:]
