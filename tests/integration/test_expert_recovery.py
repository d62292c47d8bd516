"""A Ray Train pretraining run survives a killed expert actor without spending a Train failure (max_failures=0)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray

from gpfm_scale.train.stage import run
from tests.integration.pretrain_helpers import read_metrics, tiny_config, write_tile_shards

pytestmark = pytest.mark.usefixtures("ray_session")

TOTAL = 40  # steps: the run is still far from its end when the kill lands after step 1


def _last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def _kill_an_expert_after_step_one(out: Path, seen: dict) -> None:
    """Once metrics.jsonl has step 1 (the stage writes it after the first step, experts in use), kill one expert
    actor the way a crash would (Ray may restart it) and record its pid before and after."""
    deadline = time.monotonic() + 600
    while _last_step(out) < 1:
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    experts = sorted(
        (a for a in ray.util.list_named_actors(all_namespaces=True)
         if a["name"].startswith("gpfm-expert-") and "-directory-" not in a["name"]),
        key=lambda a: a["name"],
    )
    actor = ray.get_actor(experts[0]["name"], namespace=experts[0]["namespace"])
    seen["pid"] = ray.get(actor.describe.remote())["pid"]
    ray.kill(actor, no_restart=False)
    seen["at_step"] = _last_step(out)
    for _ in range(10_000):  # each call ends when the actor answers or is seen restarting
        try:
            pid = ray.get(actor.describe.remote(), timeout=300)["pid"]
        except ray.exceptions.ActorUnavailableError:
            continue
        if pid != seen["pid"]:
            seen["restarted_pid"] = pid
            return


def test_a_killed_expert_actor_costs_no_train_failure(tmp_path: Path) -> None:
    shards = write_tile_shards(tmp_path / "data")
    cfg = tiny_config(**{"run.total_iters": TOTAL, "run.checkpoint_every": TOTAL, "run.max_failures": 0,
                         "expert_placement.mode": "remote", "expert_placement.accelerator_resource": "test_gpu",
                         "expert_placement.cpus_per_actor": 0.5, "expert_placement.expert_gpus_per_node": 2})
    seen: dict = {}
    killer = threading.Thread(target=_kill_an_expert_after_step_one, args=(tmp_path / "out", seen))
    killer.start()
    result = run(cfg, str(tmp_path / "out"), shards=str(shards))
    killer.join()
    assert seen.get("pid") is not None, "no expert actor was found to kill"
    assert 1 <= seen["at_step"] < TOTAL and seen["restarted_pid"] != seen["pid"]
    steps = [r["step"] for r in read_metrics(tmp_path / "out")]
    assert steps == list(range(1, TOTAL + 1)) and result.steps == TOTAL  # never restarted from a checkpoint
