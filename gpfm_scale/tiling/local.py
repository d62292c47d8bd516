"""A one-worker tiling run inside the command's own process: the same `TileWorker` and driver bookkeeping
(`driver.Driver`) as the Ray path (`stage._dispatch`), with no Ray at all, so a local run starts tiling at once
instead of after Ray's 3-10 s start-up.

Everything the driver guarantees holds unchanged: shard names are reserved and journaled before use, a shard is
committed by its journal record (then `on_commit` runs), the output lock is held by `stage.run`, and the metrics
are the driver's own (served from this process). What does not apply is actor-death handling: a worker crash here
is the command's crash, and a rerun resumes from the last committed shard, as after a killed driver.
"""

from __future__ import annotations

import collections
import logging
import os
import sys

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.driver import Driver
from gpfm_scale.tiling.progress import TilingProgress
from gpfm_scale.tiling.worker import TileWorker

log = logging.getLogger(__name__)

ONLY = 0
"""The driver's index for the one in-process worker (its actor index on the Ray path)."""


def runs_in_process(cfg: TilingConfig, n_todo: int) -> bool:
    """Whether this run's slides are tiled in this process (`TilingSettings.in_process`).

    auto: only a run that would start its own one-actor local Ray instance: no address given, no Ray session up
    (`embed` tiling inside its own session keeps its actors), no GPU or custom resource per worker (nothing to
    reserve them from), and one worker (`workers: 1`, or a single slide to tile)."""
    if cfg.in_process != "auto":
        return cfg.in_process == "always"
    ray = sys.modules.get("ray")
    return (not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
            and not (ray is not None and ray.is_initialized())
            and cfg.gpus_per_worker == 0 and not cfg.actor_resources
            and (cfg.workers == 1 or n_todo == 1))


def dispatch_in_process(cfg: TilingConfig, out: OutputDir, driver: Driver, todo: list[str]) -> None:
    """Tile `todo` in order with one `TileWorker` in this process; results go through `driver` as an actor's do."""
    log.info("tiling in this process (one worker, no Ray)")
    worker = TileWorker(cfg.model_dump(mode="json"), out.url)  # umask None: this process's own is the user's
    pending = collections.deque(driver.tasks[sid] for sid in todo)
    with TilingProgress(len(todo)) as progress:
        while pending:
            task = pending.popleft()
            driver.manifest.count_attempt(task.slide_id)  # journaled with the next record
            outcome, sealed, ran_on = worker.process(task, driver.shard_name(ONLY))
            driver.accept(ONLY, outcome, sealed, ran_on, pending)
            progress.slide_done(outcome.n_tiles, driver.manifest.counts["failed"])
        sealed, now = worker.flush(driver.shard_name(ONLY))
        driver.seen_alive(ONLY, now, pending)
        if sealed is not None:
            driver.commit_shard(ONLY, sealed)
