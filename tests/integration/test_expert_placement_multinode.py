"""Expert actors land on the node of the workers they serve: two Ray nodes on this machine, `test_gpu` for GPUs.

The cluster runs in a subprocess (`expert_placement_scenario.py`): `ray.cluster_utils.Cluster` cannot share a
process with the session's `ray.init`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("expert_placement_scenario.py")


@pytest.fixture(scope="module")
def scenario() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.run(
        [sys.executable, str(SCENARIO)], capture_output=True, text=True, timeout=180, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_nodes_each_get_their_own_expert_actors(scenario: dict) -> None:
    nodes = list(scenario["nodes"].values())
    assert len(set(nodes)) == 2
    assert set(scenario["names_by_node"]) == set(nodes)
    tokens = set()
    for node, names in scenario["names_by_node"].items():
        assert [re.sub(r"^gpfm-expert-[0-9a-f]{6}-", "", n) for n in names] == [f"{node[:8]}-0", f"{node[:8]}-1"]
        tokens |= {n.split("-")[2] for n in names}
    assert len(tokens) == 1  # one placement, one token


def test_a_worker_connects_to_the_experts_of_its_own_node(scenario: dict) -> None:
    for node, seen in scenario["seen"].items():
        assert seen["node_id"] == node
        assert [a["node_id"] for a in seen["actors"]] == [node, node]
        assert [a["experts"] for a in seen["actors"]] == [["tiny_a"], ["tiny_b"]]
        assert seen["pid"] not in {a["pid"] for a in seen["actors"]}
        assert seen["shapes"] == {"tiny_a": [[2, 48], [2, 16, 48]], "tiny_b": [[2, 32]]}
    pids = [a["pid"] for seen in scenario["seen"].values() for a in seen["actors"]]
    assert len(set(pids)) == 4 and scenario["driver_pid"] not in pids


def test_a_worker_on_a_node_without_experts_is_told_so(scenario: dict) -> None:
    head, worker = scenario["nodes"]["head"], scenario["nodes"]["worker"]
    assert scenario["misplaced"].startswith(f"no expert actors on this node ({head[:8]})")
    assert f"placed on nodes: {worker[:8]}" in scenario["misplaced"]


def test_a_group_pinned_to_a_full_node_does_not_spill_onto_the_free_one(scenario: dict) -> None:
    # Unpinned, Ray reserves the extra expert GPU on the worker node (one test_gpu free) and starts it there.
    head = scenario["nodes"]["head"]
    assert scenario["spill"].startswith(f"node {head[:8]}: could not reserve 1 x")
