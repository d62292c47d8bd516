"""Ask the cluster for what a stage needs and wait for it, so that stages start right on autoscaling clusters.

The shipped clusters (cluster/*.yaml, kuberay) start with a head that advertises 0 CPUs and scale their worker
types from 0: when a job starts, `ray.cluster_resources()` shows nothing to run on. A stage that sized itself from
that number at once would refuse to start, or pick CPU where a GPU node was minutes away. So each stage first
states its need as Ray resource bundles (one per actor / worker, e.g. 12 x {GPU: 1, CPU: 8}), hands them to the
autoscaler (`request_resources`, a no-op hint on a fixed or local cluster) and waits, logging its progress, until
the first `min_bundles` fit on the nodes that are up; past `timeout_s` it fails with ResourcesUnavailableError
(CLI exit 2) rather than run on whatever is there.

"Fit" packs the bundles in order, first fit, onto each alive node's total resources (a bundle never straddles two
nodes, as an actor cannot). Totals, not what is free: the stage's own actors are not started yet, and resources
held by another job only make Ray queue ours, which it does visibly.

The request is withdrawn once the wait ends: `request_resources` is one cluster-wide floor (each call replaces
the last), and left standing it would keep nodes up after the job. Once the stage's actors are scheduled they
keep their nodes busy, and any further demand (restarts after a lost node) reaches the autoscaler as pending
actors, as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from gpfm_scale.errors import ResourcesUnavailableError
from gpfm_scale.ray_utils import started_local

log = logging.getLogger(__name__)

Bundle = dict[str, float]
"""Ray resources of one actor or worker, e.g. {"CPU": 8, "GPU": 1} or {"CPU": 1, "tiling": 1}."""

LOG_EVERY_S = 15.0
POLL_S = 0.5


def alive_nodes() -> list[Bundle]:
    """Total resources of each alive node (the head included, whatever it advertises)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]


def _fits(bundle: Bundle, free: Bundle) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def leading_fit(bundles: Sequence[Bundle], nodes: Sequence[Bundle]) -> int:
    """How many of `bundles`, taken in order, fit on `nodes` (first fit, never split): the count before the first
    that fits nowhere."""
    free = [dict(n) for n in nodes]
    for i, bundle in enumerate(bundles):
        node = next((f for f in free if _fits(bundle, f)), None)
        if node is None:
            return i
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    return len(bundles)


def count_fitting(bundle: Bundle, nodes: Sequence[Bundle]) -> int:
    """How many copies of `bundle` the nodes hold at once (what a stage sizes its actor pool by)."""
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        raise ValueError(f"bundle {bundle} asks for nothing")
    return sum(min(int(n.get(k, 0.0) / v + 1e-9) for k, v in need.items()) for n in nodes)


def describe(bundles: Sequence[Bundle]) -> str:
    """'12 x {GPU: 1, CPU: 8}' (runs of equal bundles grouped, in order)."""
    parts: list[str] = []
    i = 0
    while i < len(bundles):
        j = i
        while j < len(bundles) and bundles[j] == bundles[i]:
            j += 1
        inner = ", ".join(f"{k}: {v:g}" for k, v in bundles[i].items() if v > 0)
        parts.append(f"{j - i} x {{{inner}}}")
        i = j
    return " + ".join(parts)


def wait_for_resources(bundles: Sequence[Bundle], *, what: str, timeout_s: float,
                       min_bundles: int | None = None) -> int:
    """Request `bundles` from the autoscaler and return once the first `min_bundles` (default: all) fit on the
    alive nodes; -> how many of them fit then. Logs progress every LOG_EVERY_S s; ResourcesUnavailableError past
    `timeout_s` seconds, or at once on a local instance this process started (`ensure_ray`: nothing will join
    it). Ray must be initialised."""
    from ray.autoscaler.sdk import request_resources

    bundles = [{k: float(v) for k, v in b.items() if v > 0} for b in bundles]
    need = len(bundles) if min_bundles is None else min(min_bundles, len(bundles))
    shape = describe(bundles)
    start = time.monotonic()
    next_log = start
    request_resources(bundles=bundles)
    try:
        while True:
            fit = leading_fit(bundles, alive_nodes())
            if fit >= need:
                if time.monotonic() > start + POLL_S:
                    log.info("%s: %d/%d of %s available after %.0f s", what, fit, len(bundles), shape,
                             time.monotonic() - start)
                return fit
            now = time.monotonic()
            if started_local():
                raise ResourcesUnavailableError(
                    f"{what}: this machine's local Ray instance offers {fit}/{len(bundles)} of {shape} (need "
                    f"{need}) and adds no nodes: ask for less, or join a cluster (ray_address / RAY_ADDRESS)")
            if now - start >= timeout_s:
                raise ResourcesUnavailableError(
                    f"{what}: waited {timeout_s:g} s for {shape} but only {fit}/{len(bundles)} fit on the cluster's "
                    f"nodes (need {need}); check `ray status` (node types that provide these resources, their "
                    "max_workers, cloud quota) or raise resources_timeout_s")
            if now >= next_log:
                log.info("%s: waiting for %s: %d/%d available; the autoscaler is starting nodes (timeout %g s)",
                         what, shape, fit, len(bundles), timeout_s)
                next_log = now + LOG_EVERY_S
            time.sleep(POLL_S)
    finally:
        request_resources(bundles=[])
