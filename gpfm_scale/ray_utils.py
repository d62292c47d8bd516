"""Joining or starting Ray, in one place, so every stage behaves the same from the CLI, tests and `ray job submit`."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_started_local = False

# Ray's own loggers: at INFO/WARNING they print start-up chatter, the token-auth notice and the Train controller's
# PlacementGroupCleaner warnings (a third of a demo log); our own errors reach the user through gpfm_scale's logs.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
_QUIET_RAY_LEVEL, _QUIET_OTHER_LEVEL = logging.ERROR, logging.WARNING
# the same for Ray's worker processes, which inherit the driver's environment when it starts a local instance
# (not RAY_BACKEND_LOG_LEVEL: setting it makes every raylet and core worker log that it was set)
_QUIET_RAY_ENV = {"RAY_LOGGER_LEVEL": "error", "RAY_DATA_LOG_LEVEL": "ERROR"}
_verbose = False


def configure_logging(level: str) -> None:
    """The CLI's logging: `level` for our own loggers; Ray's loggers at ERROR and NumExpr's at WARNING (its thread
    count is logged at INFO on import) unless `level` is DEBUG, which brings everything back.

    `ray.data` reads its level from RAY_DATA_LOG_LEVEL when first imported, and `ray.init` resets the "ray" logger,
    so the levels are also kept in the environment and applied again by `ensure_ray`; a variable the user already
    set wins.
    """
    global _verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also where a handler was installed before (basicConfig then does nothing)
    _verbose = level == "DEBUG"
    if not _verbose:
        for key, value in _QUIET_RAY_ENV.items():
            os.environ.setdefault(key, value)
    _apply_levels()


def ray_level_name() -> str:
    """The level for Ray's loggers as a name, for the Ray APIs that take one (Ray Train's LoggingConfig)."""
    return logging.getLevelName(_ray_level())


def _ray_level() -> int:
    return logging.INFO if _verbose else _QUIET_RAY_LEVEL  # INFO: Ray's own default for its "ray" logger


def _apply_levels() -> None:
    """Verbose: Ray's defaults ("ray" at INFO, the rest inheriting); else Ray at ERROR, NumExpr at WARNING."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(_ray_level() if name == "ray" or not _verbose else logging.NOTSET)
    logging.getLogger("numexpr").setLevel(logging.NOTSET if _verbose else _QUIET_OTHER_LEVEL)


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
    _apply_levels()  # importing ray configured its logger at INFO
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, logging_level=_ray_level())
        _started_local = False
    else:
        log.info("starting a local Ray instance")
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, log_to_driver=True,
                 logging_level=_ray_level())
        _started_local = True
