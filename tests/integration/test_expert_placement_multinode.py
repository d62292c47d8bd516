"""Expert actors follow the workers they serve: two Ray nodes on this machine, `test_gpu` for GPUs.

The cluster runs in a subprocess (`expert_placement_scenario.py`, which tells the story): `ray.cluster_utils.Cluster`
cannot share a process with the session's `ray.init`.
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
        [sys.executable, str(SCENARIO)], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_experts_are_placed_on_a_node_when_its_first_worker_asks(scenario: dict) -> None:
    a, head = scenario["nodes"]["a"], scenario["nodes"]["head"]
    assert scenario["placed_before"] == {}
    assert list(scenario["placed_after_a"]) == [a]  # lazily: the head has no worker yet, so no experts
    assert set(scenario["placed_both"]) == {a, head}
    assert scenario["placed_both"][a] == scenario["placed_after_a"][a]  # A's actors were not placed twice
    for node, names in scenario["placed_both"].items():
        assert [re.sub(r"^gpfm-expert-[0-9a-f]{6}-", "", n) for n in names] == [f"{node[:8]}-0", f"{node[:8]}-1"]
    tokens = {n.split("-")[2] for names in scenario["placed_both"].values() for n in names}
    assert len(tokens) == 2  # one placement (one fresh token) per node


def test_a_worker_uses_the_experts_of_its_own_node(scenario: dict) -> None:
    for key, node in (("a", scenario["nodes"]["a"]), ("head", scenario["nodes"]["head"])):
        seen = scenario["runs"][key]
        assert seen["node_id"] == node
        assert [a["node_id"] for a in seen["actors"]] == [node, node]
        assert [a["experts"] for a in seen["actors"]] == [["tiny_a"], ["tiny_b"]]
        assert seen["pid"] not in {a["pid"] for a in seen["actors"]}
    pids = [a["pid"] for key in ("a", "head") for a in scenario["runs"][key]["actors"]]
    assert len(set(pids)) == 4 and scenario["driver_pid"] not in pids


def test_a_killed_expert_actor_restarts_and_training_gets_the_same_targets(scenario: dict) -> None:
    run = scenario["runs"]["a"]
    assert run["steps"] == 6 and run["max_diff"] < 1e-5  # all steps, targets of the same (seeded) experts
    assert run["killed_pid"] is not None and run["actors"][0]["pid"] != run["killed_pid"]  # a new process
    assert run["actors"][0]["node_id"] == scenario["nodes"]["a"]  # restarted in its bundle, on its node


def test_losing_a_node_leaves_the_other_nodes_workers_training(scenario: dict) -> None:
    head = scenario["nodes"]["head"]
    for key in ("after_loss", "fresh_after_loss"):
        run = scenario["runs"][key]
        assert run["steps"] == 3 and run["max_diff"] < 1e-5
        assert {a["node_id"] for a in run["actors"]} == {head}
    before = {a["pid"] for a in scenario["runs"]["head"]["actors"]}
    assert {a["pid"] for a in scenario["runs"]["fresh_after_loss"]["actors"]} == before  # same actors, not re-placed


def test_a_group_pinned_to_a_full_node_does_not_spill_onto_the_free_one(scenario: dict) -> None:
    # Unpinned, Ray reserves the extra expert GPU on node A (one test_gpu free) and starts it there.
    head = scenario["nodes"]["head"]
    assert scenario["spill"].startswith(f"node {head[:8]}: could not reserve 1 x")
