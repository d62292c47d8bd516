"""`run(cfg, slides, out) -> TilingResult`: the tiling stage, driven from one process over a pool of Ray actors
(or, for a one-worker local run, one worker in the driver's own process: `local.py`).

The driver is the only writer of the run manifest and the only one that names shards; it holds the output lock
(`gpfm_scale.run_lock`) on `out` from before it reads anything there to the end, so a second run into the same
directory is refused (exit 2, naming the holder). The driver reserves shard names `{run}-{NNNNNN}.tar` (journaled
in blocks before any is handed out) and sends each task with its actor's current name; when an actor seals a shard
(at a slide boundary past the size cap) it publishes it straight under that name, and the driver commits it by
appending one journal record marking its slides done (`journal.py`). Exactness under failure follows from that order:
- a killed actor loses only slides whose shard was never journaled: they go back to pending and are redone; a shard
  it had already published is a reserved orphan, deleted at the end of the run (`resume.sweep_orphans`);
- a killed driver leaves temporary shards (cleared on the next start) and, at worst, published shards whose slides
  were not yet journaled: such reserved orphans are deleted on the next start and their slides redone (`resume.py`).
So every tile of a done slide is in exactly one committed shard, and no shard holds a tile of an unfinished slide.
Bookkeeping is O(1) per slide: a journal append per commit, counters instead of scans, and a full manifest rewrite
only at start, at the end and every `COMPACT_EVERY_S` seconds / `COMPACT_EVERY_COMMITS` records. That bookkeeping,
actor deaths and failed slides included, is `driver.py`'s; this module builds the inputs, starts the actors, runs
the dispatch loop and sums up the run.
Slides of earlier runs that are not in this run's input keep their rows and shards untouched (`manifest.py`).
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from gpfm_scale import storage
from gpfm_scale.atomic import current_umask
from gpfm_scale.config import dump_config
from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.run_manifest import MANIFEST_NAME, segments
from gpfm_scale.metrics import serve_metrics
from gpfm_scale.ray_utils import ensure_ray
from gpfm_scale.resources import alive_nodes, count_fitting, wait_for_resources
from gpfm_scale.run_lock import OutputLock
from gpfm_scale.slides.mpp import parse_manifest_mpp
from gpfm_scale.tiling import journal
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.driver import CommitHook, Driver, fail_slide
from gpfm_scale.tiling.inputs import load_slide_table
from gpfm_scale.tiling.local import dispatch_in_process, runs_in_process
from gpfm_scale.tiling.manifest import RunManifest, SlideOutcome
from gpfm_scale.tiling.progress import TilingProgress
from gpfm_scale.tiling.resume import CONFIG_NAME, check_layout, reconcile, sweep_orphans
from gpfm_scale.tiling.slide_job import SlideTask
from gpfm_scale.tiling.worker import TileWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingResult:
    out: str
    manifest: str
    n_slides: int
    n_done: int
    n_failed: int
    n_tiles: int
    n_bytes: int
    seconds: float
    worker_restarts: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    no_tiles: list[tuple[str, str]] = field(default_factory=list)
    """Input slides done with 0 tiles, and why (no tissue found, no tile fits): done, but worth a look."""
    absent: list[str] = field(default_factory=list)
    """Slides of earlier runs into `out` that are not in this run's input: kept as they were, not counted above."""

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.n_failed == 0


def _tasks(table: pd.DataFrame) -> tuple[dict[str, SlideTask], dict[str, str]]:
    """Per-slide work, and the slides whose manifest `mpp` cell is unusable (slide id -> reason)."""
    raw = table["mpp"] if "mpp" in table.columns else [None] * len(table)
    tasks, invalid = {}, {}
    for sid, path, m in zip(table["slide_id"], table["path"], raw):
        try:
            mpp = parse_manifest_mpp(None if pd.api.types.is_scalar(m) and pd.isna(m) else m)
        except ValueError as err:
            invalid[sid], mpp = str(err), None
        tasks[sid] = SlideTask(sid, path, mpp)
    return tasks, invalid


def _refuse_invalid(manifest: RunManifest, todo: list[str], invalid: dict[str, str]) -> list[str]:
    """Fail the slides to tile whose input is unusable, with the reason; the rest is still to do."""
    for sid in todo:
        if sid in invalid:
            log.warning("slide %s failed: %s", sid, invalid[sid])
            fail_slide(manifest, SlideOutcome(sid, ok=False, reason=f"ConfigError: {invalid[sid]}"))
    return [sid for sid in todo if sid not in invalid]


def run(cfg: TilingConfig, slides: str, out_url: str, on_commit: CommitHook | None = None) -> TilingResult:
    """Tile every slide of `slides` (manifest, folder or glob) into `out_url`, resuming what is already there;
    `on_commit` sees each committed shard (`CommitHook`)."""
    start = time.perf_counter()
    out_url = storage.resolve_out(out_url)
    table = load_slide_table(slides)
    with OutputLock(out_url, "tile"):
        return _run_locked(cfg, table, out_url, start, on_commit)


def _run_locked(cfg: TilingConfig, table: pd.DataFrame, out_url: str, start: float,
                on_commit: CommitHook | None) -> TilingResult:
    out = OutputDir(out_url, cfg.staging_dir)
    out.makedirs()
    check_layout(out, cfg)
    previous = RunManifest.load(out)
    manifest = RunManifest.from_inputs(table, previous)
    next_shard = reconcile(out, manifest, previous is not None, cfg.run_name)  # refuses a DIR that is not ours
    out.write_bytes_atomic(dump_config(cfg).encode(), CONFIG_NAME)
    inputs = manifest.in_input()
    if cfg.retry_failed:
        manifest.reset([sid for sid in inputs if manifest.rows[sid]["status"] == "failed"])
    tasks, invalid = _tasks(table)
    todo = _refuse_invalid(manifest, [sid for sid in inputs if manifest.rows[sid]["status"] == "pending"], invalid)
    seq = max([*segments(out), manifest.through]) + 1
    manifest.save(out, seq - 1)  # compact: everything replayed so far, plus this start's changes
    commit_log = journal.Journal(out, seq)
    commit_log.prune(seq - 1)
    absent = manifest.absent()
    if absent:
        log.warning("%d slide(s) of earlier runs are not in this input; kept as they are: %s%s", len(absent),
                    ", ".join(absent[:10]), " ..." if len(absent) > 10 else "")
    log.info("%d slide(s): %d to tile, %d done, %d failed", len(inputs), len(todo), manifest.counts["done"],
             manifest.counts["failed"])
    driver = Driver(cfg, out, manifest, tasks, next_shard, commit_log, on_commit)
    try:
        if todo:
            if cfg.metrics_port is not None:
                serve_metrics(cfg.metrics_port, cfg.metrics_host)
            if runs_in_process(cfg, len(todo)):
                dispatch_in_process(cfg, out, driver, todo)
            else:
                _dispatch(cfg, out, driver, todo)
        out.clear_tmp()
        sweep_orphans(out, manifest)
        driver.compact()
    finally:
        driver.journal.close()
    rows = {sid: manifest.rows[sid] for sid in inputs}
    failed = [(sid, r["reason"]) for sid, r in rows.items() if r["status"] == "failed"]
    done = [sid for sid, r in rows.items() if r["status"] == "done"]
    no_tiles = [(sid, rows[sid]["reason"]) for sid in done if not rows[sid]["n_tiles"]]
    return TilingResult(
        out=out.url, manifest=storage.join(out.url, MANIFEST_NAME), n_slides=len(rows), n_done=len(done),
        n_failed=len(failed), n_tiles=driver.tiles, n_bytes=driver.bytes, seconds=time.perf_counter() - start,
        worker_restarts=driver.restarts, failed=failed, no_tiles=no_tiles, absent=absent)


def _actor_count(cfg: TilingConfig, n_slides: int) -> int:
    """Ask for `workers` actors (1 when unset) and wait until one fits: actors beyond the nodes that are up wait
    in Ray's queue, with their slides, until the autoscaler starts more. Unset `workers`: as many as fit now."""
    bundle = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker, **cfg.actor_resources}
    wait_for_resources([bundle] * min(cfg.workers or 1, n_slides), what="tiling actors",
                       timeout_s=cfg.resources_timeout_s, min_bundles=1)
    return min(cfg.workers or max(1, count_fitting(bundle, alive_nodes())), n_slides)


def _dispatch(cfg: TilingConfig, out: OutputDir, driver: Driver, todo: list[str]) -> None:
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    ensure_ray(cfg.ray_address)
    n_workers = _actor_count(cfg, len(todo))
    remote_cls = ray.remote(TileWorker)
    opts = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker, "resources": dict(cfg.actor_resources),
            "max_restarts": -1, "max_task_retries": 0}
    cfg_dict = cfg.model_dump(mode="json")
    token = uuid.uuid4().hex[:8]  # named so operators (and tests) can find them: gpfm-tiling-{run}-{i}
    umask = current_umask()  # the user's, not that of whoever started the Ray workers: files get the modes they expect
    actors = [remote_cls.options(name=f"gpfm-tiling-{token}-{i}", **opts).remote(cfg_dict, out.url, umask)
              for i in range(n_workers)]
    log.info("tiling with %d actor(s)", n_workers)
    pending = collections.deque(driver.tasks[sid] for sid in todo)
    inflight: dict[Any, tuple[int, SlideTask, str]] = {}  # ref -> actor, task, incarnation it was sent to

    def current(i: int) -> str | None:
        while True:
            try:
                return ray.get(actors[i].incarnation.remote())
            except ActorUnavailableError:
                continue  # unreachable for a moment (Ray says it may come back): ask again
            except RayActorError:
                return None

    def running(i: int, failed: Any, sent_to: str) -> SlideTask:
        """The slide incarnation `sent_to` of actor `i` ran when it died: an actor runs its tasks in the order
        sent, so the first one sent to it that did not succeed (`failed`, or one sent before it whose failure is
        not handled yet). A reply lost with a process killed the instant it finished a slide is not told apart."""
        for ref in driver.queues[i]:
            if ref is failed:
                break
            if inflight[ref][2] != sent_to:
                continue
            try:
                ray.get(ref, timeout=0)  # no remote call: a finished task's result is here already
            except (RayActorError, GetTimeoutError):
                return inflight[ref][1]
        return inflight[failed][1]

    quiet_since = time.perf_counter()
    progress = TilingProgress(len(todo))
    try:
        while pending or inflight:
            for _depth in range(cfg.max_inflight_per_worker):  # round-robin: every actor gets work first
                for i, actor in enumerate(actors):
                    if pending and len(driver.queues[i]) <= _depth:
                        task = pending.popleft()
                        driver.manifest.count_attempt(task.slide_id)  # journaled with the next record
                        ref = actor.process.remote(task, driver.shard_name(i))
                        inflight[ref] = (i, task, driver.alive[i])
                        driver.queues[i].append(ref)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            quiet_since = _warn_if_stalled(ready, quiet_since, cfg)
            for ref in ready:
                i, task, sent_to = inflight[ref]
                try:
                    outcome, sealed, ran_on = ray.get(ref)
                except RayActorError:
                    killer = running(i, ref, sent_to)
                    del inflight[ref]
                    driver.queues[i].remove(ref)
                    before = len(pending)
                    driver.actor_died(i, task, sent_to, pending, current, killer)
                    progress.redo(max(0, len(pending) - before - 1))
                    continue
                del inflight[ref]
                driver.queues[i].remove(ref)
                before = len(pending)
                driver.accept(i, outcome, sealed, ran_on, pending)
                if len(pending) > before:  # a late answer of a process already counted dead: the slide is redone
                    progress.redo(1)
                    continue
                progress.slide_done(outcome.n_tiles, driver.manifest.counts["failed"])
            if not pending and not inflight:
                _flush(actors, driver, pending, RayActorError, current)
    finally:
        progress.close()
        for actor in actors:
            ray.kill(actor)


STALL_WARNING_S = 120.0


def _warn_if_stalled(ready: list[Any], quiet_since: float, cfg: TilingConfig) -> float:
    """Say so when nothing finished for a while: usually actors waiting for CPUs another job holds."""
    import ray

    now = time.perf_counter()
    if ready:
        return now
    if now - quiet_since < STALL_WARNING_S:
        return quiet_since
    log.warning("no slide finished in %.0f s; free resources %s (each tiling actor needs %s CPU): another job may "
                "hold the cluster, or a slide is very large", now - quiet_since,
                {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}, cfg.cpus_per_worker)
    return now


def _flush(actors: list[Any], driver: Driver, pending: collections.deque, actor_error: type,
           current: Callable[[int], str | None]) -> None:
    """Seal every actor's open shard; an actor that dies here sends its uncommitted slides back to `pending` (the
    death counted once per incarnation, as in the dispatch loop; no slide is charged: none was running)."""
    import ray

    for i, actor in enumerate(actors):
        sealed = None
        while True:
            sent_to = driver.alive[i]
            try:
                sealed, now = ray.get(actor.flush.remote(driver.shard_name(i)))
                driver.seen_alive(i, now, pending)  # a process that died unseen took its open shard with it
                break
            except actor_error:
                if driver.died(i, sent_to, current, pending):
                    break  # its open shard died with it: the slides are back in `pending`
                # else the same process answers again (it was unreachable for a moment) and still holds the shard
        if sealed is not None:
            driver.commit_shard(i, sealed)
