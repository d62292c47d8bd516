"""Stages on an autoscaling cluster: nodes join after the job starts, and a GPU that never comes is an error.

The cluster (`ray.cluster_utils.Cluster`, head with 0 CPUs like the shipped ones) runs in a subprocess
(`autoscale_scenario.py`): it cannot share a process with the session's `ray.init`. Each stage's wait is started
first; the node is added only once the wait has said it is waiting, so nothing depends on timing except the
explicit 2-s timeout of the failing case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("autoscale_scenario.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path_factory.mktemp("autoscale"))],
                          capture_output=True, text=True, timeout=400, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiling_waits_for_a_tiling_node_and_runs_its_actors_there(scenario):
    tiling = scenario["tiling"]
    assert scenario["head_cpus"] == 0  # the actors could run nowhere but on the node that joined
    assert tiling["n_done"] == 2 and tiling["n_failed"] == 0 and tiling["n_tiles"] > 0
    assert "tiling actors: waiting for 1 x {CPU: 1, tiling: 1}: 0/1 available; the autoscaler is starting " \
           "nodes (timeout 300 s)" in tiling["lines"]
    assert "tiling with 2 actor(s)" in tiling["lines"]  # sized from the new node's 2 `tiling` slots
    assert tiling["node"] in scenario["alive"]


def test_a_gpu_run_without_gpu_nodes_fails_with_a_clear_message(scenario):
    assert scenario["no_gpu"].startswith(
        "training workers: waited 2 s for 1 x {CPU: 1, GPU: 1} but only 0/1 fit on the cluster's nodes")


def test_pretraining_waits_for_its_gpus_and_trains_on_them(scenario):
    pretrain = scenario["pretrain"]
    assert pretrain["use_gpu"] is True
    assert any(line.startswith("training workers: waiting for 1 x {CPU: 1, GPU: 1}: 0/1 available")
               for line in pretrain["lines"])


def test_embedding_with_a_gpu_asked_for_waits_for_every_actor_gpu(scenario):
    embed = scenario["embed"]
    # The GPU node of the pretraining step holds the first actor and the read slot; the second actor needs a new one.
    assert any(line.startswith("embedding: waiting for 1 x {CPU: 1, GPU: 1} + 1 x {CPU: 1} + 1 x {CPU: 1, GPU: 1}: "
                               "2/3 available") for line in embed["lines"])
    assert (embed["gpus"], embed["num_actors"], embed["device"]) == (2, 2, "cuda")
