"""Issue 12.1: the run manifest's journal. A commit appends one record instead of rewriting manifest.parquet;
the state (parquet + records after it) replays exactly, survives a torn last line and an interrupted compaction,
and its counters equal a scan. Driven through the real driver (`driver.Driver`), no Ray needed."""

from __future__ import annotations

import collections
import random

import pandas as pd
import pytest

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.run_manifest import MANIFEST_NAME, read_state, segments
from gpfm_scale.contracts.shards import SealedShard
from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling import journal
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.driver import Driver
from gpfm_scale.tiling.manifest import RunManifest, SlideOutcome
from gpfm_scale.tiling.resume import reconcile, sweep_orphans
from gpfm_scale.tiling.slide_job import SlideTask
from gpfm_scale.tiling.worker import FIRST


def _start(tmp_path, n: int = 6) -> tuple[OutputDir, Driver]:
    """What a run start does: rows for the input, one compaction, a fresh journal segment."""
    out = OutputDir(str(tmp_path))
    out.makedirs()
    table = pd.DataFrame({"slide_id": [f"s{i}" for i in range(n)], "path": [f"/x/s{i}.svs" for i in range(n)],
                          "label": ["a"] * n})
    manifest = RunManifest.from_inputs(table, None)
    manifest.save(out, -1)
    tasks = {sid: SlideTask(sid, manifest.rows[sid]["path"]) for sid in manifest.rows}
    return out, Driver(TilingConfig(run_name="tiles"), out, manifest, tasks, 0, journal.Journal(out, 0))


def _seal(tmp_path, driver: Driver, actor: int, sids: list[str]) -> SealedShard:
    """An actor's part: publish a (tiny, real) file under the name the driver reserved."""
    name = driver.shard_name(actor)
    (tmp_path / "shards" / name).write_bytes(b"tar")
    return SealedShard(str(tmp_path / "shards" / name), "sha", 3, sids, len(sids), name)


def _tiles(sid: str, n: int = 4) -> SlideOutcome:
    return SlideOutcome(sid, ok=True, n_tiles=n, bytes=100 * n, mpp=0.5, reader="openslide")


def _accept(driver: Driver, actor: int, outcome: SlideOutcome, sealed: SealedShard | None,
            ran_on: str = FIRST, pending: collections.deque | None = None) -> None:
    """A result from the actor's process `ran_on` (the same one unless a test says otherwise)."""
    driver.accept(actor, outcome, sealed, ran_on, collections.deque() if pending is None else pending)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False)


def test_a_commit_appends_a_record_and_replay_equals_the_state(tmp_path):
    out, driver = _start(tmp_path)
    parquet = (tmp_path / MANIFEST_NAME).read_bytes()
    for sid in ("s0", "s1", "s2"):
        driver.manifest.count_attempt(sid)
    _accept(driver, 0, _tiles("s0"), None)
    _accept(driver, 0, SlideOutcome("s1", ok=False, reason="SlideReadError: bad"), None)
    _accept(driver, 0, _tiles("s2"), _seal(tmp_path, driver, 0, ["s0", "s2"]))
    assert (tmp_path / MANIFEST_NAME).read_bytes() == parquet  # no rewrite per commit
    state = read_state(str(tmp_path))
    _same(state, driver.manifest.to_frame())
    rows = state.set_index("slide_id")
    assert list(rows.loc["s0", "shards"]) == list(rows.loc["s2", "shards"]) == ["tiles-000000.tar"]
    assert rows.loc["s1", "status"] == "failed" and rows.loc["s0", "attempts"] == 1
    assert rows.loc["s3", "status"] == "pending" and rows.loc["s3", "label"] == "a"


def test_a_torn_last_line_is_ignored_and_a_damaged_one_refused(tmp_path):
    out, driver = _start(tmp_path)
    _accept(driver, 0, _tiles("s0"), _seal(tmp_path, driver, 0, ["s0"]))
    before = driver.manifest.to_frame()
    segment = tmp_path / "journal" / "000000000.jsonl"
    with open(segment, "ab") as f:  # a driver killed while writing the next commit
        f.write(b'{"set":{"s1":{"status":"do')
    _same(read_state(str(tmp_path)), before)
    with open(segment, "ab") as f:  # the same bytes with a newline: not a torn write but damage
        f.write(b"\n")
    with pytest.raises(ConfigError, match="not a journal record"):
        read_state(str(tmp_path))


def test_compaction_holds_the_journal_and_is_atomic(tmp_path, monkeypatch):
    out, driver = _start(tmp_path)
    _accept(driver, 0, _tiles("s0"), _seal(tmp_path, driver, 0, ["s0"]))
    through = driver.journal.roll()
    driver.manifest.save(out, through)  # a driver killed here, before pruning: the old segment stays...
    (tmp_path / "journal" / f"{through:09d}.jsonl").open("ab").write(
        journal.encode({"set": {"s0": {"status": "failed"}}}))
    _same(read_state(str(tmp_path)), driver.manifest.to_frame())  # ...and is never replayed over the parquet
    _accept(driver, 1, _tiles("s1"), _seal(tmp_path, driver, 1, ["s1"]))
    committed = driver.manifest.to_frame()

    def killed(*_args):
        raise OSError("killed mid-compaction")

    monkeypatch.setattr(OutputDir, "write_bytes_atomic", killed)
    with pytest.raises(OSError):
        driver.compact()
    _same(read_state(str(tmp_path)), committed)  # old parquet + journal: nothing lost


def test_counters_equal_a_scan(tmp_path):
    out, driver = _start(tmp_path, 40)
    m, rng = driver.manifest, random.Random(0)
    for _ in range(300):
        sid, op = f"s{rng.randrange(40)}", rng.randrange(4)
        if op == 0:
            m.mark_done(_tiles(sid, rng.randrange(5)), "tiles-000001.tar", "sha")
        elif op == 1:
            m.mark_failed(SlideOutcome(sid, ok=False, reason="x"))
        elif op == 2:
            m.reset([sid])
        else:
            m.count_attempt(sid)
        driver._append()
    listed = [r for r in m.rows.values() if r["in_input"]]
    assert +m.counts == collections.Counter(r["status"] for r in listed)
    assert m.tiles == sum(r["n_tiles"] for r in listed if r["status"] == "done")
    replayed = RunManifest.load(out)
    assert +replayed.counts == +m.counts and replayed.tiles == m.tiles


def test_reserved_orphans_are_deleted_and_nothing_referenced_is(tmp_path):
    """A shard an actor published under a reserved name with no record (driver or actor killed before the commit)
    is an orphan even when older than a committed one; an unreserved stray is still refused."""
    out, driver = _start(tmp_path)
    orphan = _seal(tmp_path, driver, 0, ["s0"])  # actor 0 published, its result never came back
    _accept(driver, 1, _tiles("s1"), _seal(tmp_path, driver, 1, ["s1"]))  # actor 1 committed a newer index
    assert orphan.name < "tiles-000001.tar"
    state = RunManifest.load(out)
    manifest = RunManifest.from_inputs(pd.DataFrame({"slide_id": ["s0", "s1"], "path": ["/x/s0", "/x/s1"]}), state)
    assert reconcile(out, manifest, True, "tiles") >= 2
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["tiles-000001.tar"]
    assert manifest.rows["s0"]["status"] == "pending" and manifest.rows["s1"]["status"] == "done"
    (tmp_path / "shards" / "tiles-000000.tar").write_bytes(b"not ours: nothing reserves it now")
    with pytest.raises(ConfigError, match="move them away"):
        reconcile(out, manifest, True, "tiles")


def test_end_of_run_sweep_removes_a_lost_actors_shard_only(tmp_path):
    out, driver = _start(tmp_path)
    lost = _seal(tmp_path, driver, 0, ["s0"])
    driver.requeue_uncommitted(0, collections.deque())  # actor 0 died after publishing: its name is retired
    _accept(driver, 0, _tiles("s0"), _seal(tmp_path, driver, 0, ["s0"]))  # redone under a fresh name
    assert sweep_orphans(out, driver.manifest) == 1
    assert not (tmp_path / "shards" / lost.name).exists()
    assert (tmp_path / "shards" / driver.manifest.rows["s0"]["shards"][0]).exists()


def test_embed_reads_the_journaled_state_not_the_lagging_parquet(tmp_path):
    from gpfm_scale.embed.inputs import load_tile_source

    out, driver = _start(tmp_path)
    _accept(driver, 0, _tiles("s0"), _seal(tmp_path, driver, 0, ["s0"]))  # committed by journal record only
    source = load_tile_source(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in source.shards] == ["tiles-000000.tar"]
    assert source.manifest.set_index("slide_id").loc["s0", "status"] == "done"


def test_on_an_object_store_each_record_is_its_own_object():
    """No appends there: a commit writes one small object, and compaction prunes those it holds."""
    import uuid

    out = OutputDir(f"memory://journal-{uuid.uuid4().hex}")
    out.makedirs()
    manifest = RunManifest.from_inputs(pd.DataFrame({"slide_id": ["a", "b"], "path": ["/x/a", "/x/b"]}), None)
    manifest.save(out, -1)
    log_ = journal.Journal(out, 0)
    manifest.mark_done(_tiles("a"), "tiles-000000.tar", "sha")
    log_.append(manifest.take_dirty())
    manifest.mark_failed(SlideOutcome("b", ok=False, reason="x"))
    log_.append(manifest.take_dirty())
    assert sorted(segments(out)) == [0, 1]
    _same(read_state(out), manifest.to_frame())
    through = log_.roll()
    manifest.save(out, through)
    log_.prune(through)
    assert segments(out) == {} and log_.seq == 2
    _same(read_state(out), manifest.to_frame())


def test_one_death_is_counted_once_however_many_tasks_it_fails_but_a_poison_slide_still_fails(tmp_path):
    """One process death fails every task that reached it: the one it ran, those queued behind it, and tasks the
    driver re-sent before Ray told it (they reach the dead process too). Counted per incarnation, it is one death,
    charged once; a slide that kills every fresh process still fails after `max_worker_deaths_per_slide` (2)."""
    out, driver = _start(tmp_path)
    incarnations = {0: iter(["p2", "p3"]), 1: iter(["q2", "q3"])}
    asked: list[int] = []

    def current(actor: int) -> str:  # the actor's process now, as Ray has restarted it
        asked.append(actor)
        return next(incarnations[actor])

    pending = collections.deque()
    _accept(driver, 0, _tiles("s5"), None, FIRST)  # the first process holds s5 uncommitted
    s0, s1, s2 = (driver.tasks[s] for s in ("s0", "s1", "s2"))
    driver.actor_died(0, s1, FIRST, pending, current, s0)  # queued behind s0, which the process was running
    driver.actor_died(0, s0, FIRST, pending, current, s0)
    driver.actor_died(0, s2, FIRST, pending, current, s2)  # re-sent before the driver knew: reached it too
    driver.actor_died(0, s2, FIRST, pending, current, s2)
    assert driver.restarts == 1 and asked == [0] and driver.alive[0] == "p2"
    assert sorted(t.slide_id for t in pending) == ["s0", "s1", "s2", "s2", "s5"] and driver.deaths == {"s0": 1}
    assert all(driver.manifest.rows[s]["status"] == "pending" for s in ("s0", "s1", "s2", "s5"))
    _accept(driver, 0, _tiles("s1"), None, FIRST, pending)  # a late answer of the dead process: redone
    assert 0 not in driver.uncommitted and list(pending)[0].slide_id == "s1"
    driver.actor_died(0, s0, "p2", pending, current, s0)  # the fresh process died on s0 too: a second death
    assert driver.manifest.rows["s0"]["status"] == "failed" and driver.restarts == 2
    assert read_state(str(tmp_path)).set_index("slide_id").loc["s0", "status"] == "failed"
    # actor 1: both tasks failed with its first process: one death
    s3, s4 = driver.tasks["s3"], driver.tasks["s4"]
    driver.actor_died(1, s4, FIRST, pending, current, s3)
    driver.actor_died(1, s3, FIRST, pending, current, s3)
    assert driver.restarts == 3 and driver.manifest.counts["failed"] == 1


def test_a_death_seen_only_by_a_new_process_answering_is_counted_and_its_slides_redone(tmp_path):
    """A process that died with no task of it failing (between tasks) is noticed when another one answers."""
    out, driver = _start(tmp_path)
    pending = collections.deque()
    _accept(driver, 0, _tiles("s0"), None, FIRST, pending)
    _accept(driver, 0, _tiles("s1"), None, "p2", pending)  # s0 was in the dead process's open shard
    assert driver.restarts == 1 and [t.slide_id for t in pending] == ["s0"]
    assert list(driver.uncommitted[0]) == ["s1"]
    for sid in ("s2", "s3"):  # its failed tasks come after: charged to a slide once, not counted again
        task = driver.tasks[sid]
        driver.actor_died(0, task, FIRST, pending, lambda actor: pytest.fail("known dead: not asked"), task)
    assert driver.restarts == 1 and driver.deaths == {"s2": 1}


def test_a_process_that_answers_again_is_not_dead_and_a_gone_actor_counts_every_failure(tmp_path):
    out, driver = _start(tmp_path)
    pending = collections.deque()
    _accept(driver, 0, _tiles("s5"), None, FIRST, pending)
    s0 = driver.tasks["s0"]
    driver.actor_died(0, s0, FIRST, pending, lambda actor: FIRST, s0)  # unreachable for a moment
    assert driver.restarts == 0 and list(driver.uncommitted[0]) == ["s5"]
    for _ in (1, 2):  # gone for good: nothing answers, each failure is a death, and the slide fails
        driver.actor_died(0, s0, driver.alive[0], pending, lambda actor: None, s0)
    assert driver.restarts == 2 and driver.manifest.rows["s0"]["status"] == "failed"


def test_an_actor_never_publishes_over_an_existing_shard(tmp_path):
    """A stale name (a task queued for a restarted actor) must not overwrite a committed or orphan shard: the
    actor keeps its shard open past the soft cap until a task brings a free name."""
    from gpfm_scale.tiling.worker import TileWorker

    worker = TileWorker(TilingConfig(shard_max_bytes=1).model_dump(mode="json"), str(tmp_path))
    worker.writer.begin_slide()
    worker.writer.add("s0/0_0", {"jpg": b"x" * 10})
    (tmp_path / "shards").mkdir(exist_ok=True)
    (tmp_path / "shards" / "tiles-000003.tar").write_bytes(b"committed")
    assert not worker.may_seal("tiles-000003.tar") and worker.may_seal("tiles-000004.tar")
    sealed = worker._ship(worker.writer.commit_slide("s0", 1, worker.may_seal("tiles-000004.tar")),
                          "tiles-000004.tar")
    assert sealed.name == "tiles-000004.tar" and not worker.may_seal("tiles-000004.tar")
    assert (tmp_path / "shards" / "tiles-000003.tar").read_bytes() == b"committed"
