"""Shared fixtures: one local Ray instance per test session, the real data folder, small synthetic slides."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray 2.60 secures new clusters with a token (~/.ray/auth_token, created by the head if missing); every client
# (this driver, `ray job submit`, job entrypoints) sends it only when RAY_AUTH_MODE says so, and Ray reads the
# variable once per process, at import: hence here, before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"

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


@dataclass
class _Head:
    """The session's Ray head: a `ray start --head --block` process, as on a cluster."""

    proc: subprocess.Popen
    gcs_address: str
    dashboard_url: str


def _start_head() -> _Head:
    """`ray start --head` on loopback, with every port chosen free and its own temp dir.

    Not `ray.init()`: that cannot move the dashboard agent off its fixed default port (52365), so a second Ray on
    the machine (another test session, the demo) left this one without a job agent; nor does it write the temp
    dir's `ray_current_cluster`, from which job entrypoints resolve RAY_ADDRESS=auto. 4 logical CPUs on 2 cores:
    training workers, expert actors and Ray Data tasks each hold a CPU slot, and with only 2 they can wait on each
    other forever. `test_gpu` stands in for GPUs where placement is tested. The metrics agent exports every second
    (10 s by default) so that tests scraping it wait less.
    """
    gcs_port, dashboard_port = free_port(), free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           f"--temp-dir={tempfile.mkdtemp(prefix='gpfm-ray-', dir='/tmp')}", "--node-ip-address=127.0.0.1",
           f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", "--num-cpus=4", '--resources={"test_gpu": 4}',
           '--system-config={"metrics_report_interval_ms": 1000}']
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return _Head(proc, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")


def _connect(ray, head: _Head, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if head.proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.proc.returncode}")
        try:
            ray.init(address=head.gcs_address, log_to_driver=False)
            return
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


_HEAD: list[_Head] = []


@pytest.fixture(scope="session")
def ray_session():
    """One Ray head for every test that needs it (starting Ray costs 5-10 s and ~1 GB with its dashboard, which
    serves the Job Submission API of tests/integration/test_job_submit.py)."""
    import ray

    if not ray.is_initialized():
        # Job entrypoints run in a shell of the node's environment: the installed CLI must be on its PATH.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        os.environ.pop("RAY_ADDRESS", None)
        head = _start_head()
        _HEAD.append(head)
        try:
            _connect(ray, head)
        except BaseException:
            head.proc.terminate()
            raise
    yield ray
    ray.shutdown()
    for head in _HEAD:
        head.proc.terminate()
        head.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def ray_dashboard(ray_session) -> str:
    """http://127.0.0.1:PORT of the session head's dashboard (the Job Submission API)."""
    if not _HEAD:
        pytest.skip("Ray was started outside this test session: its dashboard address is unknown")
    return _HEAD[0].dashboard_url


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


@dataclass
class Bucket:
    """An S3 bucket on a moto server of this test session: `url` (s3://NAME), `env` (credentials and endpoint,
    what a cluster's nodes or a job's runtime_env would set)."""

    url: str
    env: dict[str, str]
    endpoint: str


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3 API (moto's server mode, on a free loopback port) with one empty bucket, and this process's
    environment pointing botocore / s3fs / pyarrow at it for the session."""
    import logging

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("gpfm-test")
    try:
        yield Bucket("s3://gpfm-test", env, endpoint)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def ray_with_bucket(ray_session, s3_bucket):
    """The session's Ray, reconnected with the bucket's settings in the job's runtime_env (env_vars), as a user
    passes them to a cluster: workers started before the moto server do not see this driver's later environment.
    The head keeps running; the plain connection is restored afterwards."""
    if not _HEAD:
        pytest.skip("Ray was started outside this test session: cannot reconnect with a runtime_env")
    ray_session.shutdown()
    ray_session.init(address=_HEAD[0].gcs_address, log_to_driver=False,
                     runtime_env={"env_vars": dict(s3_bucket.env)})
    try:
        yield ray_session
    finally:
        ray_session.shutdown()
        ray_session.init(address=_HEAD[0].gcs_address, log_to_driver=False)
