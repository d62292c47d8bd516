"""Expert clients (in-process and Ray actors), the one-step-ahead prefetcher, and placement on one Ray node."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import pytest
import torch

from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.models.experts import build_expert
from gpfm_scale.train.expert_actors import ExpertActorError, ExpertPrefetcher, ExpertServer, InProcessExperts
from gpfm_scale.train.expert_config import ExpertPlacementConfig, resolve_assignment
from gpfm_scale.train.expert_placement import (
    actor_name,
    build_expert_client,
    connect_node_experts,
    place_expert_actors,
    release_expert_actors,
)

EXPERTS = [ExpertConfig(name="tiny_a", patch_weight=1.0), ExpertConfig(name="tiny_b")]
GRID = (4, 4)


def _crops(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def _placement(**overrides) -> ExpertPlacementConfig:
    base = {"expert_gpus_per_node": 2, "accelerator_resource": "test_gpu", "cpus_per_actor": 0.5}
    return ExpertPlacementConfig(**(base | overrides))


# ---- config ---------------------------------------------------------------------------------------------------


def test_assignment_round_robin_and_explicit() -> None:
    cfg = ExpertPlacementConfig(expert_gpus_per_node=2)
    assert resolve_assignment(["uni", "phikon", "conch"], cfg) == [["uni", "conch"], ["phikon"]]
    explicit = ExpertPlacementConfig(expert_gpus_per_node=2, assignment=[["uni"], ["phikon", "conch"]])
    assert resolve_assignment(["uni", "phikon", "conch"], explicit) == [["uni"], ["phikon", "conch"]]


def test_assignment_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="lists 1 expert GPUs but expert_gpus_per_node is 2"):
        ExpertPlacementConfig(expert_gpus_per_node=2, assignment=[["uni"]])
    with pytest.raises(ValueError, match="more than one GPU: uni"):
        ExpertPlacementConfig(expert_gpus_per_node=2, assignment=[["uni"], ["uni"]])
    with pytest.raises(ConfigError, match="not configured experts: virchow; experts on no GPU: conch"):
        cfg = ExpertPlacementConfig(expert_gpus_per_node=2, assignment=[["uni"], ["virchow"]])
        resolve_assignment(["uni", "conch"], cfg)
    with pytest.raises(ConfigError, match="3 expert GPUs for 2 experts"):
        resolve_assignment(["uni", "conch"], ExpertPlacementConfig(expert_gpus_per_node=3))
    with pytest.raises(ValueError, match="extra"):
        ExpertPlacementConfig(gpus=1)


# ---- prefetcher with fake clients -----------------------------------------------------------------------------


@dataclass
class _FakePending:
    key: int
    ready_at: float
    events: list

    def result(self, timeout_s: float | None = None):
        time.sleep(max(self.ready_at - time.perf_counter(), 0.0))
        self.events.append(("result", self.key))
        return {"fake": {"cls": torch.full((1, 1), float(self.key)), "patch": None}}, {"compute_s": 0.0}


class _FakeClient:
    """Records submissions; one server that takes `latency_s` per request, in submission order."""

    def __init__(self, events: list, latency_s: float = 0.0) -> None:
        self.events, self.latency_s, self.busy_until = events, latency_s, 0.0

    def submit(self, crops: torch.Tensor, grid):
        key = int(crops[0, 0, 0, 0])
        self.events.append(("submit", key))
        self.busy_until = max(time.perf_counter(), self.busy_until) + self.latency_s
        return _FakePending(key, self.busy_until, self.events)


def _batches(n: int):
    return [{"global_crops_uint8": torch.full((1, 3, 2, 2), k, dtype=torch.uint8), "k": k} for k in range(n)]


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetcher_issues_next_request_before_the_step(depth: int) -> None:
    events: list = []
    for step in ExpertPrefetcher(_batches(4), _FakeClient(events), GRID, depth=depth):
        assert step.targets["fake"]["cls"].item() == step.batch["k"]
        events.append(("step", step.batch["k"]))
    if depth == 1:
        expected = ["s0", "s1", "r0", "step0", "s2", "r1", "step1", "s3", "r2", "step2", "r3", "step3"]
    else:
        expected = ["s0", "s1", "s2", "r0", "step0", "s3", "r1", "step1", "r2", "step2", "r3", "step3"]
    short = {"submit": "s", "result": "r", "step": "step"}
    assert [f"{short[kind]}{k}" for kind, k in events] == expected


def _mean_wait(client, consumer_s: float, n: int = 6) -> float:
    waits = []
    for step in ExpertPrefetcher(_batches(n), client, GRID):
        time.sleep(consumer_s)
        waits.append(step.stats["wait_s"])
    return sum(waits[1:]) / (n - 1)  # the first step cannot overlap anything


def test_prefetcher_hides_expert_latency_behind_a_slower_step() -> None:
    # A 50 ms expert behind a 0 ms step: every step waits for a whole request. Behind an 80 ms step the request
    # for step k+1 finishes while step k computes: nothing left to wait for.
    fast = _mean_wait(_FakeClient([], latency_s=0.05), consumer_s=0.0)
    slow = _mean_wait(_FakeClient([], latency_s=0.05), consumer_s=0.08)
    assert fast == pytest.approx(0.05, abs=0.01)
    assert slow < 0.01


# ---- in-process experts ---------------------------------------------------------------------------------------


def test_in_process_matches_the_experts_on_the_student_grid() -> None:
    crops = _crops(0)
    targets, stats = InProcessExperts(EXPERTS).submit(crops, (2, 3)).result()
    direct_a = build_expert(EXPERTS[0])(crops, (2, 3))
    assert targets["tiny_a"]["patch"].shape == (4, 6, 48)
    torch.testing.assert_close(targets["tiny_a"]["patch"], direct_a["patch"])
    torch.testing.assert_close(targets["tiny_b"]["cls"], build_expert(EXPERTS[1])(crops)["cls"])
    assert targets["tiny_b"]["patch"] is None and stats["compute_s"] > 0
    with pytest.raises(ValueError, match="uint8"):
        InProcessExperts(EXPERTS[:1]).submit(crops.float(), GRID)


@pytest.mark.gpu
def test_cuda_experts_compute_in_bf16_and_reply_in_float16() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    crops = _crops(2, n=8)
    want, _ = InProcessExperts(EXPERTS).submit(crops, GRID).result()
    got, _ = InProcessExperts(EXPERTS, "cuda").submit(crops.cuda(), GRID).result()
    assert got["tiny_a"]["patch"].device.type == "cuda" and got["tiny_a"]["patch"].dtype == torch.float32
    torch.testing.assert_close(got["tiny_a"]["patch"].cpu(), want["tiny_a"]["patch"], atol=0.1, rtol=0.05)
    reply = ExpertServer(EXPERTS, "cuda").forward(crops.numpy(), GRID)
    assert reply["targets"]["tiny_b"]["cls"].dtype.name == "float16"
    torch.testing.assert_close(
        torch.from_numpy(reply["targets"]["tiny_b"]["cls"]).float(), want["tiny_b"]["cls"], atol=0.05, rtol=0.05
    )


# ---- Ray actors on the test node ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def placed(ray_session):
    actors = place_expert_actors(EXPERTS, _placement())
    yield actors
    release_expert_actors(actors)


@pytest.fixture(scope="module")
def remote(placed):
    return connect_node_experts(placed.names_by_node)


def test_actors_run_in_other_processes_on_this_node(ray_session, placed, remote) -> None:
    node = ray_session.get_runtime_context().get_node_id()
    (names,) = placed.names_by_node.values()
    token = names[0].split("-")[2]
    assert list(placed.names_by_node) == [node] and re.fullmatch(r"[0-9a-f]{6}", token)
    assert names == [actor_name(node, 0, f"gpfm-expert-{token}"), actor_name(node, 1, f"gpfm-expert-{token}")]
    infos = remote.describe()
    assert [i["experts"] for i in infos] == [["tiny_a"], ["tiny_b"]]
    assert all(i["node_id"] == node and i["device"] == "cpu" for i in infos)
    assert len({i["pid"] for i in infos} | {os.getpid()}) == 3


@pytest.mark.parametrize("grid", [(4, 4), (2, 3)])
def test_remote_and_in_process_give_the_same_targets(remote, grid) -> None:
    crops = _crops(1, n=3)
    got, stats = remote.submit(crops, grid).result(timeout_s=60)
    want, _ = InProcessExperts(EXPERTS).submit(crops, grid).result()
    assert got["tiny_a"]["patch"].shape == (3, grid[0] * grid[1], 48) and got["tiny_b"]["patch"] is None
    for name in ("tiny_a", "tiny_b"):
        torch.testing.assert_close(got[name]["cls"], want[name]["cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["tiny_a"]["patch"], want["tiny_a"]["patch"], atol=1e-5, rtol=1e-5)
    assert got["tiny_a"]["cls"].dtype == torch.float32 and got["tiny_a"]["cls"].is_contiguous()
    assert 0 < stats["compute_s"] <= stats["wait_s"]


def test_remote_prefetch_keeps_batches_in_order(remote) -> None:
    # That prefetching hides the experts' latency is shown with fake clients above (deterministic) and measured
    # with real actors in benchmarks/bench_pretrain.py: a timing assertion here failed on a loaded machine.
    batches = [{"global_crops_uint8": _crops(10 + k, n=8)} for k in range(6)]
    reference = InProcessExperts(EXPERTS[:1])
    for step in ExpertPrefetcher(batches, remote, GRID):
        want, _ = reference.submit(step.batch["global_crops_uint8"], GRID).result()
        torch.testing.assert_close(step.targets["tiny_a"]["cls"], want["tiny_a"]["cls"], atol=1e-5, rtol=1e-5)
        assert step.stats["wait_s"] >= 0


def test_worker_on_a_node_without_experts_gets_a_clear_error(placed) -> None:
    with pytest.raises(ExpertActorError, match="no expert actors on this node .* placed on nodes: 00000000"):
        connect_node_experts({"0" * 56: ["gpfm-expert-00000000-0"]})
    with pytest.raises(ExpertActorError, match="no actor names given"):
        build_expert_client(EXPERTS, _placement(), None)
    assert isinstance(build_expert_client(EXPERTS, _placement(mode="in_process"), None), InProcessExperts)


def _leftovers(ray_session, prefix: str) -> tuple[list[str], list[str]]:
    """Named actors and placement groups of `prefix` still alive, after giving Ray's async kills 5 s."""
    deadline = time.monotonic() + 5.0
    while True:
        actors = [
            a["name"] for a in ray_session.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
        ]
        groups = [
            g["name"]
            for g in ray_session.util.placement_group_table().values()
            if g["name"].startswith(prefix) and g["state"] != "REMOVED"
        ]
        if not (actors or groups) or time.monotonic() > deadline:
            return actors, groups
        time.sleep(0.2)


def test_missing_weights_fail_inside_the_actor_and_reach_the_caller(ray_session, placed, tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    cfgs = [ExpertConfig(name="tiny_a", weights=missing)]
    with pytest.raises(ExpertActorError, match=f"test-missing-.* failed to start: .*weights file not found: {missing}"):
        place_expert_actors(cfgs, _placement(expert_gpus_per_node=1), prefix="test-missing")
    assert _leftovers(ray_session, "test-missing") == ([], [])


def test_unreservable_bundles_fail_clearly_and_are_released(ray_session, placed) -> None:
    node = next(iter(placed.names_by_node))
    cfg = _placement(cpus_per_actor=3.0, ready_timeout_s=1.0)  # 2 x 3 CPUs on a 4-CPU node: never fits
    with pytest.raises(ExpertActorError, match=f"node {node[:8]}: could not reserve 2 x"):
        place_expert_actors(EXPERTS, cfg, node_ids=[node], prefix="test-full")
    assert _leftovers(ray_session, "test-full") == ([], [])
