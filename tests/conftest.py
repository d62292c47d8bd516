"""Shared fixtures: one local Ray instance per test session, the real data folder, small synthetic slides."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (starting Ray costs 5-10 s and ~0.7 GB).

    4 logical CPUs on a 2-core machine: training workers, expert actors and Ray Data tasks each hold a CPU slot, and
    with only 2 slots they can wait on each other forever. `test_gpu` stands in for GPUs where placement is tested.
    Ray's metrics agent exports every second (10 s by default) so that tests scraping it wait less.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, resources={"test_gpu": 4}, include_dashboard=False,
                 log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


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
