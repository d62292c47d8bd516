"""Two Ray nodes on this machine; expert actors on each; a stand-in training worker pinned to each node.

Run as a script (its own Ray cluster cannot share a process with the test session's `ray.init`). Prints one JSON
line: the node ids, where each node's expert actors run, and what each stand-in worker connected to.
"""

from __future__ import annotations

import json
import os

import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.train.expert_actors import ExpertActorError
from gpfm_scale.train.expert_config import ExpertPlacementConfig
from gpfm_scale.train.expert_placement import connect_node_experts, place_expert_actors, release_expert_actors

HEAD = {"num_cpus": 2, "resources": {"test_gpu": 2}}
WORKER = {"num_cpus": 2, "resources": {"test_gpu": 3}}  # one test_gpu left free once its experts are placed


@ray.remote(num_cpus=0.5)
class StandInWorker:
    """Plays a Ray Train worker: finds the experts of its node and sends them one request."""

    def connect(self, names_by_node: dict[str, list[str]]) -> dict:
        client = connect_node_experts(names_by_node)
        crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        targets, _ = client.submit(crops, (4, 4)).result(timeout_s=60)
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "actors": client.describe(),
            "shapes": {n: [list(t.shape) for t in out.values() if t is not None] for n, out in targets.items()},
        }

    def connect_elsewhere(self, names_by_node: dict[str, list[str]]) -> str:
        """With only the other node's experts listed: the error a misplaced worker gets."""
        try:
            connect_node_experts(names_by_node)
        except ExpertActorError as err:
            return str(err)
        return "connected"


def _place_on_full_node(experts: list[ExpertConfig], cfg: ExpertPlacementConfig, node: str) -> str:
    """One more expert GPU pinned to the head node, whose test_gpu are all taken while the worker node has one
    free: pinned, it cannot be reserved; unpinned, Ray would put it on the worker node."""
    more = cfg.model_copy(update={"expert_gpus_per_node": 1, "ready_timeout_s": 1.5})
    try:
        release_expert_actors(place_expert_actors(experts, more, node_ids=[node], prefix="spill"))
    except ExpertActorError as err:
        return str(err)
    return "placed"


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "include_dashboard": False})
    cluster.add_node(**WORKER)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        alive = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: "node:__internal_head__" in n["Resources"])
        worker_node, head_node = nodes = [n["NodeID"] for n in alive]
        workers = {
            n: StandInWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
            for n in nodes
        }  # created first: their start-up overlaps the experts' placement
        experts = [ExpertConfig(name="tiny_a", patch_weight=1.0), ExpertConfig(name="tiny_b")]
        cfg = ExpertPlacementConfig(expert_gpus_per_node=2, accelerator_resource="test_gpu", cpus_per_actor=0.5)
        placed = place_expert_actors(experts, cfg, node_ids=nodes)
        spill = _place_on_full_node(experts, cfg, head_node)
        seen = {n: ray.get(w.connect.remote(placed.names_by_node)) for n, w in workers.items()}
        only_worker_node = {worker_node: placed.names_by_node[worker_node]}
        misplaced = ray.get(workers[head_node].connect_elsewhere.remote(only_worker_node))
        out = {
            "nodes": {"worker": worker_node, "head": head_node},
            "names_by_node": placed.names_by_node,
            "seen": seen,
            "misplaced": misplaced,
            "spill": spill,
            "driver_pid": os.getpid(),
        }
        print(json.dumps(out))
        release_expert_actors(placed)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
