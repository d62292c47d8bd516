"""A job that starts on a cluster with nothing to run on, as on the shipped clusters (the head advertises 0 CPUs,
worker nodes scale from 0): each stage waits, and proceeds once a node with what it asked for joins.

Run as a script with a scratch folder (its own Ray cluster cannot share a process with the test session's
`ray.init`). Each step starts a stage's wait in a thread, adds the node only once the wait has logged that it is
waiting, and records what the stage then did. Prints one JSON line. GPUs are declared (`num_gpus`), as a node
without any can; nothing runs on them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from gpfm_scale.config import build_config
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.predictor import plan_resources, wait_for_cluster
from gpfm_scale.errors import ResourcesUnavailableError
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import run as run_tiling
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.stage import await_workers
from tests.integration.tiling_helpers import make_cohort

TILING_NODE = {"num_cpus": 2, "resources": {"tiling": 2}}
GPU_NODE = {"num_cpus": 2, "num_gpus": 1}


class _Messages(logging.Handler):
    """Keeps the log lines of the stages; `waiting` is set by the wait's first progress line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.waiting = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        if "waiting for" in line:
            self.waiting.set()


def _node_joins_while_waiting(cluster: Cluster, messages: _Messages, stage: Callable[[], Any],
                              node: dict[str, Any]) -> tuple[Any, str]:
    """Run `stage` in a thread; once it logs that it waits, add `node`; -> its result and the new node's id."""
    result: dict[str, Any] = {}
    messages.waiting.clear()
    thread = threading.Thread(target=lambda: result.update(value=stage()), daemon=True)
    thread.start()
    if not messages.waiting.wait(120):
        raise RuntimeError("the stage never waited for resources")
    added = cluster.add_node(**node)
    thread.join(300)
    if "value" not in result:
        raise RuntimeError("the stage did not finish after its node joined")
    return result["value"], added.node_id


def main(scratch: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    messages = _Messages()
    for name in ("gpfm_scale.resources", "gpfm_scale.tiling.stage"):
        logging.getLogger(name).addHandler(messages)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        out: dict[str, Any] = {"head_cpus": ray.cluster_resources().get("CPU", 0)}
        cohort = make_cohort(scratch / "cohort", 2)
        tiling = build_config(TilingConfig, {"grid": {"tile_px": 256, "max_tiles_per_slide": 4},
                                             "actor_resources": {"tiling": 1}, "resources_timeout_s": 300})
        result, node = _node_joins_while_waiting(
            cluster, messages, lambda: run_tiling(tiling, str(cohort), str(scratch / "tiles")), TILING_NODE)
        out["tiling"] = {"n_done": result.n_done, "n_failed": result.n_failed, "n_tiles": result.n_tiles,
                         "node": node, "lines": list(messages.lines)}

        messages.lines.clear()
        gpu_run = {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": "yes"}
        short = build_config(PretrainConfig, {"run": {**gpu_run, "resources_timeout_s": 2}})
        try:
            await_workers(short)
            out["no_gpu"] = "proceeded"
        except ResourcesUnavailableError as err:
            out["no_gpu"] = str(err)

        messages.lines.clear()
        long = build_config(PretrainConfig, {"run": {**gpu_run, "resources_timeout_s": 300}})
        use_gpu, node = _node_joins_while_waiting(cluster, messages, lambda: await_workers(long), GPU_NODE)
        out["pretrain"] = {"use_gpu": use_gpu, "node": node, "lines": list(messages.lines)}

        messages.lines.clear()
        embed = build_config(EmbedConfig, {"gpus_per_actor": 1, "num_actors": 2, "resources_timeout_s": 300})
        resources, node = _node_joins_while_waiting(cluster, messages, lambda: wait_for_cluster(embed), GPU_NODE)
        plan = plan_resources(embed, resources)
        out["embed"] = {"num_actors": plan.num_actors, "device": plan.device, "gpus": resources.get("GPU", 0),
                        "node": node, "lines": list(messages.lines)}
        out["alive"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
