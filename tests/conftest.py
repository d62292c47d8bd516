"""Shared fixtures: one local Ray instance per test session, the real data folder, small synthetic slides."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the shared/ folder beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_svs(shared_data: Path) -> Path:
    path = shared_data / "cmu-1-small-region.svs"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


_DASHBOARD: list[str] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (starting Ray costs 5-10 s and ~0.7 GB).

    4 logical CPUs on a 2-core machine: training workers, expert actors and Ray Data tasks each hold a CPU slot, and
    with only 2 slots they can wait on each other forever. `test_gpu` stands in for GPUs where placement is tested.
    Ray's metrics agent exports every second (10 s by default) so that tests scraping it wait less. The dashboard
    (~1 GB, a few seconds) serves the Job Submission API that tests/integration/test_job_submit.py uses: one Ray
    instance for the whole session rather than a second head for that module.
    """
    import ray

    if not ray.is_initialized():
        # The job submission test sends `ray job submit` to this instance's dashboard, whose job agent runs the
        # entrypoint in a shell of the node's environment: the installed CLI must be on its PATH, as on a cluster.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # `ray job submit` entrypoints join the cluster that `{temp_dir}/ray_current_cluster` names, else any GCS
        # process they find on the machine. `ray start` writes that file, `ray.init` does not: without it, and
        # with the shared /tmp/ray, jobs joined clusters that other processes here had started (a test's
        # subprocess, another session). So: a temp dir of our own, and the file written as `ray start` would.
        temp_dir = tempfile.mkdtemp(prefix="gpfm-ray-", dir="/tmp")
        context = ray.init(_temp_dir=temp_dir, address="local", num_cpus=4, resources={"test_gpu": 4},
                           include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                           log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})
        ray._private.utils.write_ray_address(context.address_info["gcs_address"], temp_dir)
        _DASHBOARD.append(f"http://{context.dashboard_url}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_dashboard(ray_session) -> str:
    """http://127.0.0.1:PORT of the session instance's dashboard (the Job Submission API)."""
    if not _DASHBOARD:
        pytest.skip("Ray was started outside this test session: its dashboard address is unknown")
    return _DASHBOARD[0]


@pytest.fixture(scope="module", autouse=True)
def _ray_resources_released(request):
    """After each test module, every CPU slot of the shared Ray instance must be free again: a leaked actor or
    placement group would starve a later test, which would then hang in scheduling instead of failing here."""
    yield
    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources()
    deadline = time.time() + 60
    while time.time() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= total[k] - 1e-6 for k in ("CPU", "test_gpu") if k in total):
            return
        time.sleep(0.5)
    held = {k: total[k] - ray.available_resources().get(k, 0) for k in ("CPU", "test_gpu") if k in total}
    pytest.fail(f"{request.node.nodeid} left Ray resources held: {held}")
