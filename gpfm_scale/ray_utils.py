"""Joining or starting Ray, in one place, so every stage behaves the same from the CLI, tests and `ray job submit`."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_started_local = False


def started_local() -> bool:
    """True when this process started its own Ray instance: one node, no autoscaler, so waiting for more is futile."""
    return _started_local


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Use the running Ray session if there is one, else join `address` / RAY_ADDRESS, else start a local instance.

    Without an address we start our own instance (`address="local"`) rather than let Ray attach to whatever
    cluster this machine ran last; `ray job submit` sets RAY_ADDRESS, so jobs join their cluster. A local
    instance is started without the dashboard (it saves ~1 GB and 5 s); its metrics agent still runs, so worker
    metrics reach Prometheus as on a cluster, and drivers serve their own.
    """
    import ray

    global _started_local
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        _started_local = False
    else:
        log.info("starting a local Ray instance")
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, log_to_driver=True)
        _started_local = True
