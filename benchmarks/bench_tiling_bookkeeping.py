"""Driver bookkeeping cost of tiling a cohort: the old full-manifest rewrite per commit vs the journal (issue 12.1).

No slide is tiled: fake actors "return instantly". The REAL driver code (`driver.Driver`: `shard_name`, `accept`,
`commit_shard`, journal appends, periodic and final compaction, `resume.sweep_orphans`) is driven directly with
synthetic `SlideOutcome`/`SealedShard` values, and each sealed shard is a real tiny file published under its
reserved name, as an actor would. Timed per slide: the `accept` call (plus `count_attempt` at dispatch and the
progress bar's failed counter), so the figures are driver seconds, not actor work.

The old cost is measured, not modelled, but on a sample: `RunManifest.save` of the same N-row manifest (what the old
driver called at every shard commit and failure) timed `--old-samples` times, and the old postfix's
`len(with_status("failed"))` scan over all rows (after every slide) timed likewise; totals are median x commits
(and x slides for the scan).

    python benchmarks/bench_tiling_bookkeeping.py            # 86,000 slides, 5 per shard (17,200 commits)
    python benchmarks/bench_tiling_bookkeeping.py --quick    # 3,000 slides: a minute-scale sanity run
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.run_manifest import read_state
from gpfm_scale.contracts.shards import SealedShard
from gpfm_scale.tiling import journal
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.driver import Driver
from gpfm_scale.tiling.manifest import RunManifest, SlideOutcome
from gpfm_scale.tiling.resume import sweep_orphans
from gpfm_scale.tiling.slide_job import SlideTask
from gpfm_scale.tiling.worker import FIRST

log = logging.getLogger(__name__)


def _table(n: int) -> pd.DataFrame:
    """A cohort manifest with one clinical column, like a real input."""
    return pd.DataFrame({"slide_id": [f"S{i:06d}" for i in range(n)],
                         "path": [f"/data/slides/S{i:06d}.svs" for i in range(n)],
                         "label": ["LUAD" if i % 2 else "LUSC" for i in range(n)]})


def _outcome(sid: str, i: int) -> SlideOutcome:
    if i % 97 == 0:
        return SlideOutcome(sid, ok=False, reason="SlideReadError: truncated file", seconds=1.0)
    return SlideOutcome(sid, ok=True, n_tiles=1500 + i % 500, bytes=(1500 + i % 500) * 30_000, mpp=0.5,
                        mpp_source="slide", magnification=20.0, reader="cucim", zero_decode=True, seconds=40.0)


def measure_old(root: Path, n_slides: int, samples: int) -> dict[str, float]:
    """Median seconds of one old-style commit (full atomic parquet rewrite) and one old-style status scan."""
    out = OutputDir(str(root))
    out.makedirs()
    manifest = RunManifest.from_inputs(_table(n_slides), None)
    for i, sid in enumerate(manifest.rows):  # a half-done cohort: realistic row contents
        if i % 2:
            manifest.mark_done(_outcome(sid, i), f"tiles-{i // 5:06d}.tar", "ab" * 32)
    saves, scans = [], []
    for _ in range(samples):
        t = time.perf_counter()
        manifest.save(out)
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        len([sid for sid, r in manifest.rows.items() if r["status"] == "failed"])  # the old `with_status` scan
        scans.append(time.perf_counter() - t)
    return {"save_s_median": statistics.median(saves), "scan_s_median": statistics.median(scans)}


def measure_new(root: Path, n_slides: int, per_shard: int, actors: int) -> dict[str, Any]:
    """Drive the real `Driver` over the cohort; per-slide driver seconds, totals and a replay check."""
    out = OutputDir(str(root))
    out.makedirs()
    cfg = TilingConfig(run_name="tiles")
    manifest = RunManifest.from_inputs(_table(n_slides), None)
    t = time.perf_counter()
    manifest.save(out, -1)  # what a run start does (one full write)
    start_s = time.perf_counter() - t
    tasks = {sid: SlideTask(sid, manifest.rows[sid]["path"]) for sid in manifest.rows}
    driver = Driver(cfg, out, manifest, tasks, 0, journal.Journal(out, 0))
    held: dict[int, list[str]] = {a: [] for a in range(actors)}
    pending: collections.deque = collections.deque()  # nothing is redone: no actor dies here
    per_slide, commit_s, failed_seen = [], [], 0
    for i, sid in enumerate(manifest.rows):
        actor = i % actors
        t = time.perf_counter()
        manifest.count_attempt(sid)
        name = driver.shard_name(actor)
        dispatch = time.perf_counter() - t
        outcome = _outcome(sid, i)
        sealed = None
        if outcome.ok:
            held[actor].append(sid)
            if len(held[actor]) == per_shard:  # the actor seals and publishes a real (tiny) file
                (root / "shards" / name).write_bytes(b"tar")
                sealed = SealedShard(str(root / "shards" / name), "ab" * 32, 3, held[actor], 7500, name)
                held[actor] = []
        t = time.perf_counter()
        driver.accept(actor, outcome, sealed, FIRST, pending)  # each fake actor's first process, never dies
        failed_seen = manifest.counts["failed"]  # the progress bar's postfix
        took = time.perf_counter() - t + dispatch
        per_slide.append(took)
        if sealed is not None or not outcome.ok:
            commit_s.append(took)
    t = time.perf_counter()
    for actor, sids in held.items():  # end of run: flush
        if sids:
            name = driver.shard_name(actor)
            (root / "shards" / name).write_bytes(b"tar")
            driver.commit_shard(actor, SealedShard(str(root / "shards" / name), "ab" * 32, 3, sids, 1, name))
    sweep_orphans(out, manifest)
    driver.compact()
    driver.journal.close()
    end_s = time.perf_counter() - t
    state = read_state(out)
    expected = manifest.to_frame()
    assert state is not None and state.drop(columns="updated_at").equals(expected.drop(columns="updated_at"))
    assert failed_seen == int((state["status"] == "failed").sum())
    per_slide.sort()
    return {"commits": len(commit_s), "slides": n_slides,
            "commit_s_median": statistics.median(commit_s), "commit_s_p99": sorted(commit_s)[int(len(commit_s) * .99)],
            "slide_s_median": per_slide[len(per_slide) // 2], "slide_s_max": per_slide[-1],
            "loop_total_s": sum(per_slide), "start_compaction_s": start_s, "end_flush_sweep_compaction_s": end_s,
            "total_s": sum(per_slide) + start_s + end_s, "done": manifest.counts["done"],
            "failed": manifest.counts["failed"], "tiles": manifest.tiles}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, default=86_000)
    p.add_argument("--per-shard", type=int, default=5, help="slides per ~1 GB shard")
    p.add_argument("--actors", type=int, default=100)
    p.add_argument("--old-samples", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="3,000 slides, 5 old samples")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    if args.quick:
        args.slides, args.old_samples = min(args.slides, 3000), min(args.old_samples, 5)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        new = measure_new(Path(tmp) / "new", args.slides, args.per_shard, args.actors)
        old = measure_old(Path(tmp) / "old", args.slides, args.old_samples)
    old_total = old["save_s_median"] * new["commits"] + old["scan_s_median"] * args.slides
    summary = {"slides": args.slides, "commits": new["commits"], "old": {**old, "total_s_extrapolated": old_total},
               "new": new, "speedup_total": old_total / new["total_s"], "loadavg": os.getloadavg(),
               "cpus": os.cpu_count()}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
