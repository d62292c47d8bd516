"""Two Ray nodes on this machine; an expert directory; stand-in training workers pinned to each node.

Run as a script (its own Ray cluster cannot share a process with the test session's `ray.init`). Prints one JSON
line. The story, as a Ray Train job would live it:
1. a worker on node A asks: experts are placed on A only (lazily); it trains 6 steps and kills one of its expert
   actors after step 2 (`ray.kill(no_restart=False)`): every step still gets the targets of the same experts
   computed in-process;
2. a worker on the head node (where a restarted group would land) asks: experts are placed there too;
3. node A is removed: the head's worker keeps training, with its client and with a fresh one, and nothing waits on A.
Plus: a placement group pinned to a full node does not spill onto the free one.
"""

from __future__ import annotations

import json
import os

import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.train.expert_actors import ExpertActorError, ExpertPrefetcher, InProcessExperts
from gpfm_scale.train.expert_config import ExpertPlacementConfig
from gpfm_scale.train.expert_directory import release_expert_directory, start_expert_directory
from gpfm_scale.train.expert_placement import connect_node_experts, place_expert_actors, release_expert_actors

HEAD = {"num_cpus": 2, "resources": {"test_gpu": 2}}
NODE_A = {"num_cpus": 2, "resources": {"test_gpu": 3}}  # one test_gpu left free once its experts are placed
EXPERTS = [ExpertConfig(name="tiny_a", patch_weight=1.0), ExpertConfig(name="tiny_b")]
GRID = (4, 4)
WAIT_S = 120  # a bound on every call, so that a hang fails the scenario instead of blocking it


@ray.remote(num_cpus=0.25)
class StandInWorker:
    """Plays a Ray Train worker: gets the experts of its node from the directory and trains on their targets."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.client = connect_node_experts(directory)
        self.reference = InProcessExperts(EXPERTS)  # tiny experts are seeded: same weights as the actors'

    def train(self, steps: int, seed: int, kill_after: int | None = None, fresh: bool = False) -> dict:
        """`steps` prefetched steps; after step `kill_after` one of this node's expert actors is killed (Ray
        restarts it). Returns the steps done, the largest target difference and where the actors ran."""
        client = connect_node_experts(self.directory) if fresh else self.client
        gen = torch.Generator().manual_seed(seed)
        batches = [
            {"global_crops_uint8": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)}
            for _ in range(steps)
        ]
        done, worst, killed_pid = 0, 0.0, None
        for step in ExpertPrefetcher(batches, client, GRID):
            want, _ = self.reference.submit(step.batch["global_crops_uint8"], GRID).result()
            for name, out in want.items():
                for key, value in out.items():
                    if value is not None:
                        worst = max(worst, float((step.targets[name][key] - value).abs().max()))
            done += 1
            if done == kill_after:
                killed_pid = ray.get(client.actors[0].describe.remote())["pid"]
                ray.kill(client.actors[0], no_restart=False)
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "steps": done,
            "max_diff": worst,
            "killed_pid": killed_pid,
            "actors": client.describe(),
        }


def _place_on_full_node(cfg: ExpertPlacementConfig, node: str) -> str:
    """One more expert GPU pinned to the head node, whose test_gpu are all taken while node A has one free:
    pinned, it cannot be reserved; unpinned, Ray would put it on node A."""
    more = cfg.model_copy(update={"expert_gpus_per_node": 1, "ready_timeout_s": 1.5})
    try:
        release_expert_actors(place_expert_actors(EXPERTS, more, node_ids=[node], prefix="spill"))
    except ExpertActorError as err:
        return str(err)
    return "placed"


def _on(node: str, directory: str):
    return StandInWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        directory
    )


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "include_dashboard": False})
    node_a_handle = cluster.add_node(**NODE_A)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        alive = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: "node:__internal_head__" in n["Resources"])
        node_a, head = (n["NodeID"] for n in alive)
        cfg = ExpertPlacementConfig(expert_gpus_per_node=2, accelerator_resource="test_gpu", cpus_per_actor=0.5)
        directory, name = start_expert_directory(EXPERTS, cfg)
        placed_before = ray.get(directory.placed.remote())
        on_a = _on(node_a, name)
        run_a = ray.get(on_a.train.remote(6, seed=1, kill_after=2), timeout=WAIT_S)
        placed_after_a = ray.get(directory.placed.remote())
        on_head = _on(head, name)
        run_head = ray.get(on_head.train.remote(3, seed=2), timeout=WAIT_S)
        placed_both = ray.get(directory.placed.remote())
        spill = _place_on_full_node(cfg, head)
        cluster.remove_node(node_a_handle)
        after_loss = ray.get(on_head.train.remote(3, seed=3), timeout=WAIT_S)
        fresh_after_loss = ray.get(on_head.train.remote(3, seed=4, fresh=True), timeout=WAIT_S)
        out = {
            "nodes": {"a": node_a, "head": head},
            "placed_before": placed_before,
            "placed_after_a": placed_after_a,
            "placed_both": placed_both,
            "runs": {"a": run_a, "head": run_head, "after_loss": after_loss, "fresh_after_loss": fresh_after_loss},
            "spill": spill,
            "driver_pid": os.getpid(),
        }
        ray.get(directory.release.remote(), timeout=WAIT_S)  # must not wait on the lost node's actors
        release_expert_directory(directory)
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
