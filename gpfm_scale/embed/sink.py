"""Worker side of writing slide features: the inference actors write them, the driver only sees a small index.

Why parts, then a publish step: Ray Data re-batches rows between stages, so one slide's tiles reach several
batches and, with several actors, several processes (a read task owns whole shards, hence whole slides, but the
actor pool's `batch_size` bundles rows across read tasks' blocks and deals the batches to any actor). No worker
ever holds a whole slide, and routing rows by slide (`groupby`) is an all-to-all barrier that would hold a cohort's
features (0.4 TB in float16 for 190M tiles at D = 1,024) in the object store before the first file. Instead:
1. `PartWriter.summarise` runs in the inference actor right after the model: for each slide in its batch it writes
   the good rows (`index`, `coords`, `features`) to `OUT/parts/{slide_id}/{uuid}.npz` and returns one summary row
   (slide_id, part, counts, first errors, non-finite count: `SUMMARY_COLUMNS`), ~100 bytes per slide per batch
   instead of D x 2-4 bytes per tile. Features never enter Ray's object store (no extra serialisation, no CPU
   reservation for a separate sink stage); the actor's cost is one uncompressed write per batch.
2. The driver (`collect.SlideCollector`) adds up summaries; once a slide's marker and all its rows are in and
   its counts pass the checks, `Publisher` runs `publish_slide` as a zero-CPU Ray task: it concatenates exactly the
   parts the driver was told about, sorts them into shard order, writes `features/{slide_id}.h5` atomically
   (`store.write_slide_features`: temporary name, then rename) and removes the slide's parts.
Resume stays exact: only a published (renamed) .h5 counts as done; `OUT/parts/` and stale `*.h5.partial` files
are scratch, wiped at the start of every run (the run holds `OUT`'s lock), so parts of a killed run, or orphans of a
retried actor batch, are never mixed into a slide. The image-folder path keeps driver-side writing: one
`images.h5` of at most a few hundred MB does not need it.

Parts carry no atomicity of their own: a part is listed to the driver only after its write returned, and a part
file left by a failed batch is never listed. An unsafe slide id (not one path component) writes no part; non-finite
features (NaN/inf in the stored dtype) are counted, not written: the driver fails those slides (`collect.py`).
`OUT` must be storage every node sees (as for the tiler's shards): a publish that cannot find a part fails its
slide with the reason, never publishes it short. Measured (benchmarks/RESULTS.md, bench_embed_sink.py): the driver
receives 1.5 bytes per tile instead of 4,153 at D = 1,024 float32, at the same images/s.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_scale.atomic import current_umask
from gpfm_scale.contracts import features as store
from gpfm_scale.embed.collect import SlideVerdict
from gpfm_scale.errors import GpfmError, UnsafeNameError
from gpfm_scale.names import child_path

PARTS = "parts"
SUMMARY_COLUMNS = ("slide_id", "part", "n_tiles", "n_ok", "n_corrupt", "error", "n_nonfinite", "nonfinite_x",
                   "nonfinite_y", "total", "shard_error")


class PartWriter:
    """Writes each slide's good rows of a pipeline batch under `OUT/parts/` and summarises the batch per slide."""

    def __init__(self, out: str) -> None:
        self.out = out

    def summarise(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch (decode.py's columns minus `image`, plus `features` [B, D]) -> one summary row per slide."""
        slide_ids = np.asarray(batch["slide_id"]).astype(str)
        rows: dict[str, list[Any]] = {c: [] for c in SUMMARY_COLUMNS}
        for sid in map(str, np.unique(slide_ids)):
            for col, value in zip(SUMMARY_COLUMNS, self._slide(sid, {k: np.asarray(v)[slide_ids == sid]
                                                                   for k, v in batch.items()})):
                rows[col].append(value)
        return {c: np.asarray(v, dtype=str if c in ("slide_id", "part", "error", "shard_error") else np.int64)
                for c, v in rows.items()}

    def _slide(self, sid: str, rows: dict[str, np.ndarray]) -> tuple[Any, ...]:
        total = np.asarray(rows["total"], np.int64)
        marker, ok = total >= 0, np.asarray(rows["ok"], bool)
        tiles = ~marker
        bad, good = tiles & ~ok, tiles & ok
        errors = np.asarray(rows["error"]).astype(str)
        finite = np.isfinite(rows["features"]).all(axis=1)
        nonfinite = np.flatnonzero(good & ~finite)
        first_nf = (int(rows["x"][nonfinite[0]]), int(rows["y"][nonfinite[0]])) if len(nonfinite) else (-1, -1)
        part = ""
        if good.any() and not len(nonfinite):
            part = self._write(sid, rows["index"][good], np.stack([rows["x"][good], rows["y"][good]], axis=1),
                               rows["features"][good])
        shard_errors = [e for e in errors[marker] if e]
        return (sid, part, int(tiles.sum()), int(good.sum()), int(bad.sum()), next(iter(errors[bad]), ""),
                len(nonfinite), *first_nf, int(total[marker].sum()) if marker.any() else -1,
                shard_errors[0] if shard_errors else "")

    def _write(self, sid: str, index: np.ndarray, coords: np.ndarray, features: np.ndarray) -> str:
        """`OUT/parts/{sid}/{uuid}.npz`; "" (nothing written) for a slide id that is not one safe component."""
        try:
            folder = child_path(self.out, PARTS, sid)
        except UnsafeNameError:
            return ""
        os.makedirs(folder, exist_ok=True)
        name = f"{uuid.uuid4().hex}.npz"
        with open(os.path.join(folder, name), "wb") as f:
            np.savez(f, index=np.asarray(index, np.int64), coords=np.asarray(coords, np.int64), features=features)
        return name


def clear_scratch(out: str | Path) -> None:
    """Drop parts and half-written feature files of an earlier (killed) run: they are never part of a result."""
    shutil.rmtree(Path(out) / PARTS, ignore_errors=True)
    for stale in Path(out, "features").glob("*.h5.partial"):
        stale.unlink(missing_ok=True)


def publish_slide(out: str, sid: str, parts: list[str], n_rows: int, model: str, attrs: dict[str, Any],
                  coords_attrs: dict[str, Any], umask: int | None = None) -> tuple[str, str]:
    """Concatenate a slide's parts into `features/{sid}.h5` (rows in shard order); (file, "") or ("", reason).

    Runs on a worker. `n_rows` is what the summaries announced: a part that is missing or short fails the slide
    rather than publishing fewer tiles than the tiler's count. `umask`: the driver's, so the file gets the mode
    the user's session gives (`atomic.py`), not the Ray worker's."""
    old = os.umask(umask) if umask is not None else None
    try:
        index, coords, features = [], [], []
        for name in parts:
            with np.load(child_path(out, PARTS, sid, name)) as part:
                index.append(part["index"])
                coords.append(part["coords"])
                features.append(part["features"])
        if sum(map(len, index)) != n_rows:
            return "", f"its feature parts hold {sum(map(len, index))} rows, {n_rows} expected"
        order = np.argsort(np.concatenate(index), kind="stable")
        file = store.write_slide_features(out, sid, np.concatenate(features)[order], np.concatenate(coords)[order],
                                          model, attrs, coords_attrs)
        shutil.rmtree(child_path(out, PARTS, sid), ignore_errors=True)
        return file, ""
    except (OSError, ValueError, KeyError, GpfmError) as err:
        return "", f"writing its features failed: {type(err).__name__}: {err}"
    finally:
        if old is not None:
            os.umask(old)


class Publisher:
    """Runs `publish_slide` as zero-CPU Ray tasks (the pipeline holds the CPU slots; publishing is mostly I/O),
    at most `max_in_flight` at once, and hands back each slide's final verdict (published, or failed) as it ends.
    Ray starts on the first `submit` (a run with nothing to embed never needs it)."""

    def __init__(self, out: str, model: str, max_in_flight: int = 8) -> None:
        self.out, self.model, self.max_in_flight = out, model, max_in_flight
        self.umask = current_umask()
        self.remote: Any = None
        self.pending: dict[Any, SlideVerdict] = {}

    def submit(self, v: SlideVerdict, attrs: dict[str, Any], coords_attrs: dict[str, Any]) -> list[SlideVerdict]:
        """Start publishing the good slide `v`; returns the slides whose publishing finished meanwhile."""
        import ray

        self.remote = self.remote or ray.remote(num_cpus=0)(publish_slide)
        done = self.finished(block=len(self.pending) >= self.max_in_flight)
        ref = self.remote.remote(self.out, v.slide_id, list(v.parts), v.n, self.model, attrs, coords_attrs,
                                 self.umask)
        self.pending[ref] = v
        return done

    def finished(self, block: bool = False) -> list[SlideVerdict]:
        import ray

        if not self.pending:
            return []
        ready, _ = ray.wait(list(self.pending), num_returns=1 if block else len(self.pending),
                            timeout=None if block else 0)
        return [_outcome(self.pending.pop(ref), ref) for ref in ready]

    def drain(self) -> list[SlideVerdict]:
        """Wait for every publish still running (also after a pipeline failure: what finished is kept)."""
        refs, self.pending = self.pending, {}
        return [_outcome(v, ref) for ref, v in refs.items()]


def _outcome(v: SlideVerdict, ref: Any) -> SlideVerdict:
    import ray

    try:
        file, reason = ray.get(ref)
    except ray.exceptions.RayError as err:  # the publishing worker died: this slide fails, the others stand
        file, reason = "", f"publishing its features failed: {str(err).strip().splitlines()[0][:300]}"
    return replace(v, ok=not reason, file=file, reason=reason, parts=())
