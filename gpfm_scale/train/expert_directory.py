"""The one owner of the expert actors: a small named actor that places them per node, when a worker first asks.

Why an actor and not the driver placing up front: experts must be where the training workers are, and Ray Train
restarts a lost worker group on whatever nodes are free then. So the driver starts this directory (pinned to its
own node, holding no CPU) and passes its name to the workers; a worker calls `actors_for(its node id)` and gets
the names of its node's expert actors. The directory places them on the first ask (`place_expert_actors` for
that one node), with one lock per node: two workers of one node asking at once get the same actors, placed once,
while a placement on another node proceeds in parallel (threaded actor). A later ask checks that the actors still
answer (a restarting actor answers once it is back) and re-places the node if they are gone for good (its
placement group lost with a node, restarts used up).

Ownership: the driver owns the directory, the directory owns the actors (`ExpertActors` per node), so a dead
driver takes everything with it; `release_expert_directory` frees the GPUs at the end of a run.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.train.expert_actors import ExpertActorError
from gpfm_scale.train.expert_config import ExpertPlacementConfig
from gpfm_scale.train.expert_placement import (
    DEFAULT_PREFIX,
    ExpertActors,
    NamesByNode,
    place_expert_actors,
    release_expert_actors,
)

logger = logging.getLogger(__name__)

MAX_CONCURRENCY = 64  # asks answered at once: a placement can take minutes, other nodes must not wait for it
RESTART_PAUSE_S = 0.2  # between pings of a restarting actor (seen in Ray 2.60: calls fail at once while it restarts)


class ExpertDirectory:
    """Places a node's expert actors on the first `actors_for(node)`, returns their names; `ray.remote` is applied
    in `start_expert_directory`. `fixed` ({node id: actor names}) lists actors the caller placed itself (the
    benchmark's GPU-sharing actor): returned as they are, nothing placed."""

    def __init__(
        self,
        expert_cfgs: Sequence[ExpertConfig],
        cfg: ExpertPlacementConfig,
        prefix: str = DEFAULT_PREFIX,
        fixed: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.expert_cfgs, self.cfg, self.prefix = list(expert_cfgs), cfg, prefix
        self.fixed = {node: list(names) for node, names in (fixed or {}).items()}
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._placed: dict[str, ExpertActors] = {}

    def _lock(self, node_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(node_id, threading.Lock())

    def actors_for(self, node_id: str) -> list[str]:
        """Names of the expert actors of `node_id`, placed there now if it has none alive."""
        if self.fixed:
            if node_id not in self.fixed:
                placed = ", ".join(n[:8] for n in self.fixed) or "none"
                raise ExpertActorError(f"no expert actors on this node ({node_id[:8]}); placed on nodes: {placed}")
            return self.fixed[node_id]
        with self._lock(node_id):
            placed = self._placed.get(node_id)
            if placed is not None:
                if self._answers(placed):
                    return placed.names_by_node[node_id]
                logger.warning("expert actors of node %s are gone: placing them again", node_id[:8])
                release_expert_actors(placed)
                del self._placed[node_id]
            self._check_capacity(node_id)
            placed = place_expert_actors(self.expert_cfgs, self.cfg, node_ids=[node_id], prefix=self.prefix)
            self._placed[node_id] = placed
            logger.info("expert actors of node %s: %s", node_id[:8], placed.names_by_node[node_id])
            return placed.names_by_node[node_id]

    def _answers(self, placed: ExpertActors) -> bool:
        """True when every actor answers within `ready_timeout_s` (waiting out a restart), False when one is dead
        for good or never comes back (restarting in the bundle of a lost node)."""
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while True:
            try:
                ray.get([h.describe.remote() for h in placed.handles.values()],
                        timeout=max(deadline - time.monotonic(), 0.01))
                return True
            except (ray.exceptions.ActorDiedError, ray.exceptions.GetTimeoutError):
                return False
            except ray.exceptions.ActorUnavailableError:  # restarting: calls can fail fast until it is back
                if time.monotonic() > deadline:
                    return False
                time.sleep(RESTART_PAUSE_S)

    def _check_capacity(self, node_id: str) -> None:
        """Fail at once, not after `ready_timeout_s`, on a node that could never hold the experts."""
        node = next((n for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]), None)
        if node is None:
            raise ExpertActorError(f"node {node_id[:8]} is not alive: no experts placed there")
        have = node["Resources"].get(self.cfg.accelerator_resource, 0)
        if have < self.cfg.expert_gpus_per_node:
            raise ExpertActorError(
                f"node {node_id[:8]} has {have:g} {self.cfg.accelerator_resource}, expert_gpus_per_node is "
                f"{self.cfg.expert_gpus_per_node}: training workers must run on nodes with expert GPUs"
            )

    def placed(self) -> NamesByNode:
        """{node id: actor names} placed so far (logs, tests)."""
        with self._guard:
            return {node: list(p.names_by_node[node]) for node, p in self._placed.items()}

    def release(self) -> None:
        """Kill every actor and remove every group placed here; safe to call twice."""
        with self._guard:
            placed, self._placed = list(self._placed.values()), {}
        for p in placed:
            release_expert_actors(p)


def start_expert_directory(
    expert_cfgs: Sequence[ExpertConfig],
    cfg: ExpertPlacementConfig,
    prefix: str = DEFAULT_PREFIX,
    fixed: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Any, str]:
    """In the driver: start the directory on this node and wait until it answers; (handle, name). The driver must
    hold the handle until training ends (it owns the directory, which owns the actors)."""
    name = f"{prefix}-directory-{uuid.uuid4().hex[:6]}"
    here = ray.get_runtime_context().get_node_id()
    handle = (
        ray.remote(ExpertDirectory)
        .options(
            name=name,
            num_cpus=0,
            max_concurrency=MAX_CONCURRENCY,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote(expert_cfgs, cfg, prefix, fixed)
    )
    ray.get(handle.placed.remote(), timeout=cfg.ready_timeout_s)
    return handle, name


def release_expert_directory(handle: Any) -> None:
    """Free every expert GPU the directory placed, then end the directory itself."""
    try:
        ray.get(handle.release.remote())
    finally:
        ray.kill(handle)
