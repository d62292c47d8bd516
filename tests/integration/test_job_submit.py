"""`ray job submit` against a Ray head on loopback: the commands the README gives for a cluster, run for real.

A separate Ray head (with the dashboard, which serves the Job Submission API) is started for this module and
stopped at its end; jobs run from an uploaded working directory, as they do on a cloud cluster.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.pretrain_helpers import write_tile_shards
from tests.integration.tiling_helpers import make_cohort

# Deselected from `make test` for now (run with `pytest -m slow`): a second Ray head with its dashboard costs
# ~2 GB and minutes on 2 cores, and one run here outlived its 10-minute budget under load.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # Ray 2.60 enables token auth on new local clusters; the `ray job submit` client only sends the token
    # (~/.ray/auth_token, created by the head if missing) when RAY_AUTH_MODE says so.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               DS_ACCELERATOR="cpu", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rayhead")
    dash = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=4",
           '--resources={"test_gpu": 4}', f"--temp-dir={temp}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # up, and asking for Ray's auth token (which `ray job submit` sends)
            break
        except OSError:
            assert proc.poll() is None, "ray start --head exited"
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail("the Ray head's dashboard did not come up in 120 s")
    yield address
    proc.terminate()
    proc.wait(timeout=60)


def _submit(address: str, *entrypoint: str, timeout: int = 600) -> str:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entrypoint]
    for _attempt in range(45):  # the head's job agent starts a little after its dashboard answers
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stderr + done.stdout:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout, done.stdout[-3000:]
    return done.stdout


def test_pretrain_job_with_the_tiny_config(head, tmp_path):
    shards = write_tile_shards(tmp_path / "data", n_shards=2, per_shard=24)
    out = tmp_path / "run"
    _submit(head, "gpfm-scale", "pretrain", "--config", "gpfm_scale/configs/tiny.yaml", "--shards", str(shards),
            "--out", str(out), "--steps", "6", "--set", "run.checkpoint_every=3")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert (out / "export" / "model.safetensors").is_file()


def test_tile_job(head, tmp_path):
    cohort = make_cohort(tmp_path / "slides", 2, size=(1024, 768))
    out = tmp_path / "tiles"
    _submit(head, "gpfm-scale", "tile", "--slides", str(cohort), "--out", str(out), "--tile-px", "128",
            "--max-tiles", "20")
    assert len(list((out / "shards").glob("*.tar"))) >= 1
    assert (out / "manifest.parquet").is_file()
