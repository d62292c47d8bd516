"""Expert actors on the nodes of the training workers they serve: reserve, start, find, release.

One placement group per node: `expert_gpus_per_node` bundles of {accelerator: 1, CPU: cpus_per_actor}, strategy
STRICT_PACK, pinned to that node with the bundle label selector `ray.io/node-id` (a label Ray sets on every node).
Why a label and not the `node:<ip>` resource: two Ray nodes on one host (the multi-node test, or several raylets per
machine) share one IP and so one `node:<ip>` resource, while node ids are unique; and Ray itself moved from hard
`NodeAffinitySchedulingStrategy` to this label (ray.data read_api, "Ray-wide migration", PR 54940). A placement
group keeps the reservation atomic (all expert GPUs of a node or none) and lets Ray Train's workers take the rest.

Lifetime: not detached, restartable. Actors and groups are created by the expert directory (`expert_directory.py`),
a small actor the driver (the `pretrain` entry point) owns, when the first training worker of a node asks for them:
one owner, so two workers of a node never place twice, and workers that Ray Train restarts on another node get
experts there. Ownership chains to the driver, so a driver that dies takes the directory and its actors with it
and frees the GPUs (non-detached groups end with the job) instead of leaking detached actors that would also
collide by name with the next run. Ray garbage-collects a non-detached actor, named or not, once its owner holds no
handle to it: `ExpertActors` keeps the handles. A dead actor restarts in its bundle (`max_restarts`: they are
stateless); one gone for good (its node lost, restarts used up) is re-placed by the directory on the next ask.
Actors are named `{prefix}-{token}-{node_id[:8]}-{i}` in the job's namespace; a training worker asks the directory
for its node's names and finds the actors by name.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.train.expert_actors import (
    ExpertActorError,
    ExpertClient,
    ExpertServer,
    InProcessExperts,
    RemoteExperts,
    root_cause,
)
from gpfm_scale.train.expert_config import ExpertPlacementConfig, resolve_assignment

logger = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"
NamesByNode = dict[str, list[str]]  # Ray node id (hex) -> names of its expert actors


@dataclass
class ExpertActors:
    """The owner's hold on the placed actors (the expert directory's, per node): keep it while the actors serve (it
    owns them), and give it to `release_expert_actors` at the end."""

    names_by_node: NamesByNode
    handles: dict[str, Any] = field(default_factory=dict, repr=False)  # actor name -> handle
    groups: dict[str, PlacementGroup] = field(default_factory=dict, repr=False)  # node id -> its group


DEFAULT_PREFIX = "gpfm-expert"


def actor_name(node_id: str, index: int, prefix: str = DEFAULT_PREFIX) -> str:
    """Name of expert actor `index` of a node; `prefix` carries the placement's own token (see
    `place_expert_actors`)."""
    return f"{prefix}-{node_id[:8]}-{index}"


def group_name(node_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Name of a node's expert placement group."""
    return f"{prefix}-group-{node_id[:8]}"


def _bundle(cfg: ExpertPlacementConfig) -> dict[str, float]:
    bundle = {cfg.accelerator_resource: 1.0, "CPU": cfg.cpus_per_actor}
    return {k: v for k, v in bundle.items() if v > 0}


def _reserve(node_id: str, cfg: ExpertPlacementConfig, prefix: str) -> PlacementGroup:
    n = cfg.expert_gpus_per_node
    return ray.util.placement_group(
        [_bundle(cfg)] * n,
        strategy="STRICT_PACK",
        name=group_name(node_id, prefix),
        bundle_label_selector=[{NODE_ID_LABEL: node_id}] * n,
    )


def _start_actor(
    name: str, index: int, cfgs: list[ExpertConfig], group: PlacementGroup, cfg: ExpertPlacementConfig
) -> Any:
    accel: dict[str, Any] = {"num_gpus": 1} if cfg.on_cuda else {"resources": {cfg.accelerator_resource: 1}}
    return (
        ray.remote(ExpertServer)
        .options(
            name=name,
            num_cpus=cfg.cpus_per_actor,
            max_restarts=cfg.max_restarts,
            max_concurrency=cfg.max_concurrency,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            **accel,
        )
        .remote(cfgs, "cuda" if cfg.on_cuda else "cpu", cfg.dtype, cfg.reply_dtype)
    )


def _wait_ready(groups: Mapping[str, PlacementGroup], cfg: ExpertPlacementConfig, deadline: float) -> None:
    for node_id, group in groups.items():
        try:
            ray.get(group.ready(), timeout=max(deadline - time.monotonic(), 0.01))
        except ray.exceptions.GetTimeoutError as err:
            raise ExpertActorError(
                f"node {node_id[:8]}: could not reserve {cfg.expert_gpus_per_node} x {_bundle(cfg)} within "
                f"{cfg.ready_timeout_s:.0f} s (not enough {cfg.accelerator_resource} or CPU free on that node?)"
            ) from err


def _wait_loaded(actors: Mapping[str, list[tuple[str, Any]]], deadline: float) -> None:
    for node_id, named in actors.items():
        for name, actor in named:
            try:
                info = ray.get(actor.describe.remote(), timeout=max(deadline - time.monotonic(), 0.01))
            except ray.exceptions.RayActorError as err:
                raise ExpertActorError(f"expert actor {name} failed to start: {root_cause(err)}") from err
            except ray.exceptions.GetTimeoutError as err:
                raise ExpertActorError(f"expert actor {name} did not load its experts in time") from err
            if info["node_id"] != node_id:
                raise ExpertActorError(f"expert actor {name} landed on node {info['node_id']}, not {node_id}")
            logger.info("expert actor %s: pid %d, %s on %s", name, info["pid"], info["experts"], info["device"])


def place_expert_actors(
    expert_cfgs: Sequence[ExpertConfig],
    cfg: ExpertPlacementConfig,
    node_ids: Sequence[str],
    prefix: str = DEFAULT_PREFIX,
) -> ExpertActors:
    """Start the expert actors on every node in `node_ids` and wait until each has loaded its experts (the expert
    directory calls it for one node at a time). Every actor and group name is `prefix`, a token unique to this
    call, the node and the index. On any failure everything started here is released and ExpertActorError raised."""
    groups_of = resolve_assignment([c.name for c in expert_cfgs], cfg)
    by_name = {c.name: c for c in expert_cfgs}
    nodes = list(node_ids)
    if len({n[:8] for n in nodes}) != len(nodes):
        raise ExpertActorError(f"node ids not unique in their first 8 characters: {nodes}")
    # A fresh token per placement: names are never reused within a Ray session. A driver that re-created an actor
    # under the name of one it had killed earlier never heard the new one become ALIVE (Ray 2.60, seen in a long
    # test session), and two jobs in one namespace must not collide.
    prefix = f"{prefix}-{uuid.uuid4().hex[:6]}"
    placed = ExpertActors({n: [actor_name(n, i, prefix) for i in range(len(groups_of))] for n in nodes})
    deadline = time.monotonic() + cfg.ready_timeout_s
    try:
        placed.groups.update({n: _reserve(n, cfg, prefix) for n in nodes})
        _wait_ready(placed.groups, cfg, deadline)
        actors: dict[str, list[tuple[str, Any]]] = {}
        for n in nodes:
            named = zip(placed.names_by_node[n], groups_of, strict=True)
            actors[n] = [
                (name, _start_actor(name, i, [by_name[e] for e in held], placed.groups[n], cfg))
                for i, (name, held) in enumerate(named)
            ]
            placed.handles.update(dict(actors[n]))
        _wait_loaded(actors, deadline)
    except BaseException:
        release_expert_actors(placed)
        raise
    return placed


def connect_node_experts(directory: str, device: str | torch.device = "cpu", retries: int = 3) -> RemoteExperts:
    """Inside a training worker: a client for the expert actors of the node this process runs on, which the expert
    directory named `directory` places there on the first ask (and re-places if they are gone for good)."""
    node_id = ray.get_runtime_context().get_node_id()
    try:
        owner = ray.get_actor(directory)
    except ValueError as err:
        raise ExpertActorError(f"expert directory {directory} not found (run ended, or another namespace)") from err

    def resolve() -> list[Any]:
        try:
            names = ray.get(owner.actors_for.remote(node_id))
        except ray.exceptions.RayError as err:
            raise ExpertActorError(f"expert directory, node {node_id[:8]}: {root_cause(err)}") from err
        try:
            return [ray.get_actor(name) for name in names]
        except ValueError as err:
            raise ExpertActorError(f"expert actor of node {node_id[:8]} not found: {err}") from err

    return RemoteExperts(resolve, device, retries)


def build_expert_client(
    expert_cfgs: Sequence[ExpertConfig],
    cfg: ExpertPlacementConfig,
    directory: str | None,
    device: str | torch.device = "cpu",
) -> ExpertClient:
    """The worker's client for `cfg.mode`: in-process experts on `device`, or the actors of its node."""
    if cfg.mode == "in_process":
        return InProcessExperts(expert_cfgs, device, cfg.dtype)
    if directory is None:
        raise ExpertActorError("remote experts: no expert directory given (start_expert_directory in the driver)")
    return connect_node_experts(directory, device, cfg.request_retries)


def release_expert_actors(placed: ExpertActors) -> None:
    """Kill the actors and remove their placement groups (freeing the expert GPUs); safe to call twice."""
    for name, handle in placed.handles.items():
        ray.kill(handle)
        logger.debug("killed expert actor %s", name)
    for group in placed.groups.values():
        ray.util.remove_placement_group(group)
    placed.handles.clear()
    placed.groups.clear()
