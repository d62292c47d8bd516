"""The tiling driver's bookkeeping, shared by both dispatch loops (`stage._dispatch` over Ray actors,
`local.dispatch_in_process` in the command's own process): it names shards, commits them, and settles each
actor's outcome, failures included.

- Names and commits: shard indices are reserved in blocks of `RESERVE_BLOCK`, journaled before any is handed out;
  a shard an actor published under its reserved name is committed by one journal record marking its slides done
  (`journal.py`), and `manifest.parquet` is rewritten every `COMPACT_EVERY_S` s / `COMPACT_EVERY_COMMITS` records.
- Failures: a slide's error fails it; an actor's death is counted once per incarnation (`worker.FIRST`, then a
  fresh token per restart), however many of its tasks fail; its uncommitted slides go back to pending, and a slide
  that kills `max_worker_deaths_per_slide` fresh processes is failed.

Ray-free, so the unit tests and `benchmarks/bench_tiling_bookkeeping.py` drive it directly.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.shards import SealedShard, shard_name
from gpfm_scale.metrics import TILING
from gpfm_scale.tiling import journal
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.manifest import RunManifest, SlideOutcome
from gpfm_scale.tiling.slide_job import SlideTask
from gpfm_scale.tiling.worker import FIRST

log = logging.getLogger(__name__)

COMPACT_EVERY_S = 300.0
"""Rewrite manifest.parquet from the state this often (~0.6 s at 86k rows): bounds what a restart replays."""
COMPACT_EVERY_COMMITS = 20_000
RESERVE_BLOCK = 256
"""Shard indices reserved per journal record: a reservation must be durable before an actor may use the name."""

GONE = "gone-"
"""Prefix of the incarnation a driver assumes for an actor that did not answer after a death (`Driver.died`)."""

CommitHook = Callable[[SealedShard], None]
"""Called in the driver with each shard right after its commit record is durable: the one point a rerun resumes
from. For embedders (progress, notifications) and for tests, which interrupt a run at an exact commit instead of
after a guessed delay. It runs inside the dispatch loop: it should return quickly."""


class Driver:
    """The bookkeeping of one run: shard names, commits, and each actor's outcome (deaths, requeues, failures)."""

    def __init__(self, cfg: TilingConfig, out: OutputDir, manifest: RunManifest, tasks: dict[str, SlideTask],
                 next_shard: int, log_: journal.Journal, on_commit: CommitHook | None = None) -> None:
        self.cfg, self.out, self.manifest, self.tasks, self.next_shard = cfg, out, manifest, tasks, next_shard
        self.journal, self.on_commit = log_, on_commit
        self.uncommitted: dict[int, dict[str, SlideOutcome]] = collections.defaultdict(dict)
        self.queues: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.names: dict[int, str] = {}
        self.reserved_hi = next_shard
        self.alive: dict[int, str] = collections.defaultdict(lambda: FIRST)
        """Per actor, the incarnation (`TileWorker.token`) last known alive: each task is tagged with it when sent."""
        self.dead: set[tuple[int, str]] = set()
        """(actor, incarnation) whose death is counted (in `restarts`): once, however many tasks it failed."""
        self.charged: set[tuple[int, str]] = set()
        """Dead incarnations whose death is charged to a slide (`deaths`): the first of its failed tasks only."""
        self.deaths: collections.Counter[str] = collections.Counter()
        self.restarts = 0
        self.tiles = 0
        self.bytes = 0
        self.records = 0
        self.compacted_at = time.monotonic()

    def shard_name(self, actor: int) -> str:
        """The name `actor` publishes its next sealed shard under (reserved durably before it is handed out)."""
        if actor not in self.names:
            if self.next_shard >= self.reserved_hi:
                self.reserved_hi = self.next_shard + RESERVE_BLOCK
                self.manifest.reserve(self.cfg.run_name, self.next_shard, self.reserved_hi)
                self._append({"reserve": [self.cfg.run_name, self.next_shard, self.reserved_hi]})
            self.names[actor] = shard_name(self.cfg.run_name, self.next_shard)
            self.next_shard += 1
        return self.names[actor]

    def _append(self, extra: dict[str, Any] | None = None) -> None:
        """Journal every change since the last record (one line: all or nothing); compact when it is time."""
        self.journal.append({**self.manifest.take_dirty(), **(extra or {})})
        self.records += 1
        if self.records >= COMPACT_EVERY_COMMITS or time.monotonic() - self.compacted_at >= COMPACT_EVERY_S:
            self.compact()

    def compact(self) -> None:
        through = self.journal.roll()
        self.manifest.save(self.out, through)
        self.journal.prune(through)
        self.records, self.compacted_at = 0, time.monotonic()

    def commit_shard(self, actor: int, sealed: SealedShard) -> None:
        """The shard is already published under its reserved name: the journal record is the commit."""
        if self.names.get(actor) == sealed.name:
            del self.names[actor]  # used: the actor's next task gets a fresh name
        for sid in sealed.slide_ids:
            outcome = self.uncommitted[actor].pop(sid)
            self.manifest.mark_done(outcome, sealed.name, sealed.sha256)
            self.tiles += outcome.n_tiles
            TILING.slides.labels(status="done").inc()
        self._append()
        self.bytes += sealed.num_bytes
        TILING.tiles_written.inc(sealed.num_samples)
        TILING.bytes_written.inc(sealed.num_bytes)
        TILING.shards_written.inc()
        if self.on_commit is not None:
            self.on_commit(sealed)

    def accept(self, actor: int, outcome: SlideOutcome, sealed: SealedShard | None, ran_on: str,
               pending: collections.deque) -> None:
        """A slide's result from incarnation `ran_on`. If that process's death was already counted, its open shard
        (and any shard it sealed here, now a reserved orphan) is lost with it: the slide is redone."""
        if (actor, ran_on) in self.dead:
            sealed = None  # its slides were requeued when the death was counted; the shard is a reserved orphan
            if outcome.ok and outcome.n_tiles:
                pending.appendleft(self.tasks[outcome.slide_id])
                return
        else:
            self.seen_alive(actor, ran_on, pending)
        settled = not outcome.ok or outcome.n_tiles == 0  # final now, not waiting for a shard
        if not outcome.ok:
            fail_slide(self.manifest, outcome)
        elif outcome.n_tiles == 0:
            log.warning("slide %s is done with no tiles: %s", outcome.slide_id, outcome.reason)
            self.manifest.mark_done(outcome, None, None)
            TILING.slides.labels(status="done").inc()
        else:
            self.uncommitted[actor][outcome.slide_id] = outcome
        if sealed is not None:
            self.commit_shard(actor, sealed)  # journals the marks above with it
        elif settled:
            self._append()

    def actor_died(self, actor: int, task: SlideTask, sent_to: str, pending: collections.deque,
                   current: Callable[[int], str | None], running: SlideTask) -> None:
        """`task`, sent to incarnation `sent_to` of `actor`, failed because the process died: requeue it; the first
        time that incarnation's death is seen, charge it to `running`, the slide it was running.

        One death fails every task that reached the process: the one it was running and those queued behind it
        (`max_inflight_per_worker`), and tasks sent before Ray told the driver (they still reach the dead process).
        Counted per incarnation, it is charged once, so one death never fails a slide, and a slide that kills every
        fresh process is failed after `max_worker_deaths_per_slide` deaths."""
        if self.died(actor, sent_to, current, pending) and (actor, sent_to) not in self.charged:
            self.charged.add((actor, sent_to))
            sid = running.slide_id
            self.deaths[sid] += 1
            if self.deaths[sid] >= self.cfg.max_worker_deaths_per_slide:
                reason = f"WorkerDied: the tiling process died {self.deaths[sid]} times on this slide"
                fail_slide(self.manifest, SlideOutcome(sid, ok=False, reason=reason))
                self._append()
        if self.manifest.rows[task.slide_id]["status"] != "failed":
            pending.appendleft(task)

    def died(self, actor: int, sent_to: str, current: Callable[[int], str | None],
             pending: collections.deque) -> bool:
        """Whether incarnation `sent_to`, to which a failed task was sent, is dead; the first time, count the death
        and requeue the slides it held uncommitted. `current(actor)` is the actor's incarnation now, waiting until
        Ray has restarted it (one small call per death, none per success); None when the actor is gone for good:
        each failure then counts, so its slides fail as before."""
        if (actor, sent_to) in self.dead:
            return True
        now = current(actor)
        if now is not None and now == sent_to:
            return False  # the same process answers: it was unreachable for a moment, not dead
        self._count_death(actor, sent_to, now, pending)
        return True

    def seen_alive(self, actor: int, now: str, pending: collections.deque) -> None:
        """`actor` answered from incarnation `now`. If that is not the process last known alive, that one died
        while no task of it failed (idle, or between tasks): count it, and redo what it held uncommitted."""
        last = self.alive[actor]
        if last == now or last.startswith(GONE):  # a gone actor that answers again came back
            self.alive[actor] = now
        elif (actor, last) not in self.dead:  # its failed tasks, if any come, still charge its slide
            self._count_death(actor, last, now, pending)

    def _count_death(self, actor: int, incarnation: str, now: str | None, pending: collections.deque) -> None:
        """`now` None: the actor is gone for good; each next failure is from an unknown process, and counts."""
        self.dead.add((actor, incarnation))
        self.alive[actor] = now if now is not None else f"{GONE}{len(self.dead)}"
        self.restarts += 1
        TILING.worker_restarts.inc()
        self.requeue_uncommitted(actor, pending)

    def requeue_uncommitted(self, actor: int, pending: collections.deque) -> int:
        """A dead actor's slides not yet journaled are redone; its name is retired (it may have published under it:
        a reserved orphan that `sweep_orphans` deletes)."""
        self.names.pop(actor, None)
        lost = list(self.uncommitted.pop(actor, {}))
        if lost:
            log.warning("tiling actor %d died; redoing %d uncommitted slide(s)", actor, len(lost))
            pending.extendleft(self.tasks[sid] for sid in lost)
        return len(lost)


def fail_slide(manifest: RunManifest, outcome: SlideOutcome) -> None:
    """Mark a slide failed with `outcome.reason` (journaled with the next record) and count it."""
    manifest.mark_failed(outcome)
    TILING.slides.labels(status="failed").inc()
