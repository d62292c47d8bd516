"""The run manifest: one durable row per slide saying what happened to it.

A slide is `pending` until the journal record naming the shard that holds its tiles is durable, then `done`; or
`failed` with a one-line reason. A done slide with no tiles (no tissue, or no tile fits) says why in `reason`
("no tiles: ..."). The state is manifest.parquet plus the journal records after it (`journal.py`; the format and
the reading side are `contracts/run_manifest.py`, which readers outside this stage use): a commit
appends one record (O(1)); the parquet is rewritten atomically only when compacted (run start and end, and every
`driver.COMPACT_EVERY_COMMITS` records or `driver.COMPACT_EVERY_S` seconds). Read it with
`contracts.run_manifest.read_state`, never the parquet alone.
Rows carry the input manifest's extra (clinical) columns through unchanged.

Rows are never dropped: a slide of an earlier run that is missing from this run's input (a subset manifest, a file
moved away) keeps its row, status and shards untouched, with `in_input` False, so its tiles stay in the dataset.
`attempts` counts every time the slide was handed to a tiling actor, over all runs into the directory (a slide
redone after a lost actor or an interrupted run counts again; a slide refused before dispatch, e.g. for an invalid
manifest mpp, has 0).
"""

from __future__ import annotations

import collections
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.run_manifest import COLUMNS, MANIFEST_NAME, META_KEY, ManifestState, listed


@dataclass
class SlideOutcome:
    """What a worker reports for one slide (before its shard is committed)."""

    slide_id: str
    ok: bool
    reason: str = ""
    n_tiles: int = 0
    bytes: int = 0
    mpp: float | None = None
    mpp_source: str = ""
    magnification: float | None = None
    reader: str = ""
    zero_decode: bool = False
    untiled_tissue_fraction: float | None = None
    """Share of the slide's tissue (per its mask) in edge strips no tile covers: 0 with grid.edge 'pad', > 0 when
    'drop' left tissue at the right/bottom edge untiled; None when the slide failed before its grid was planned."""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class RunManifest(ManifestState):
    """The manifest state (`contracts.run_manifest`) with the writer's running counters (no scans per slide).

    Every change goes through `_set`, which keeps `counts` (status of in-input rows) and `tiles` (tiles of done
    in-input rows) exact and collects the changed fields in `dirty` for the next journal record."""

    def __init__(self, rows: dict[str, dict[str, Any]], extra_columns: list[str],
                 reserved: list[list[Any]] | None = None, through: int = -1) -> None:
        super().__init__(rows, extra_columns, reserved, through)
        self.dirty: dict[str, dict[str, Any]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.tiles = 0
        for row in rows.values():
            self._count(row, 1)

    def _count(self, row: dict[str, Any], sign: int) -> None:
        if listed(row):
            self.counts[row["status"]] += sign
            if row["status"] == "done":
                self.tiles += sign * int(row["n_tiles"] or 0)

    def _set(self, slide_id: str, fields: dict[str, Any]) -> None:
        row = self.rows[slide_id]
        self._count(row, -1)
        row.update(fields)
        self._count(row, 1)
        self.dirty.setdefault(slide_id, {}).update(fields)

    def take_dirty(self) -> dict[str, Any]:
        """The journal record of every change since the last one (then forgotten)."""
        record, self.dirty = {"set": self.dirty}, {}
        return record

    def apply(self, record: dict[str, Any]) -> None:
        """Replay one journal record: already durable, so nothing of it is dirty."""
        super().apply(record)
        self.dirty = {}

    @classmethod
    def from_inputs(cls, slides: pd.DataFrame, previous: "RunManifest | None") -> "RunManifest":
        """Rows for every input slide, keeping what a previous run recorded for the same slide ids, then every
        previous row whose slide is not in this input, unchanged but for `in_input` = False."""
        extra = [c for c in slides.columns if c not in ("slide_id", "path", "mpp")]
        if previous is not None:
            extra += [c for c in previous.extra_columns if c not in extra]
        rows: dict[str, dict[str, Any]] = {}
        for rec in slides.to_dict("records"):
            sid = rec["slide_id"]
            old = previous.rows.get(sid) if previous else None
            if old is not None:
                row = dict(old)
            else:
                row = {c: None for c in COLUMNS}
                row.update(slide_id=sid, status="pending", reason="", n_tiles=0, bytes=0, shards=[],
                           shard_sha256=[], attempts=0, zero_decode=False)
            row.update(path=rec["path"], in_input=True)
            for c in extra:
                row[c] = rec.get(c, row.get(c))
            rows[sid] = row
        for sid, old in (previous.rows.items() if previous else ()):
            if sid not in rows:
                rows[sid] = dict(old, in_input=False)
        return cls(rows, extra, [list(r) for r in previous.reserved] if previous else None,
                   previous.through if previous else -1)

    def save(self, out: OutputDir, through: int | None = None) -> None:
        """Compact: write the whole state atomically, holding the journal through segment `through`."""
        if through is not None:
            self.through = through
        self.dirty = {}
        table = pa.Table.from_pandas(self.to_frame(), preserve_index=False)
        meta = {**(table.schema.metadata or {}),
                META_KEY: json.dumps({"through": self.through, "reserved": self.reserved}).encode()}
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf)
        out.write_bytes_atomic(buf.getvalue(), MANIFEST_NAME)

    def in_input(self) -> list[str]:
        return [sid for sid, r in self.rows.items() if listed(r)]

    def absent(self) -> list[str]:
        """Slides of earlier runs that are not in this run's input (kept, never touched)."""
        return [sid for sid, r in self.rows.items() if not listed(r)]

    def referenced_shards(self) -> set[str]:
        """Every shard any row names, whatever its status or input: none of these may ever be deleted."""
        return {s for r in self.rows.values() for s in r["shards"]}

    def _record(self, outcome: SlideOutcome, status: str, shards: list[str], sha256: list[str]) -> None:
        self._set(outcome.slide_id, dict(
            status=status, reason=outcome.reason, n_tiles=outcome.n_tiles, bytes=outcome.bytes, mpp=outcome.mpp,
            mpp_source=outcome.mpp_source, magnification=outcome.magnification, reader=outcome.reader,
            zero_decode=outcome.zero_decode, untiled_tissue_fraction=outcome.untiled_tissue_fraction,
            seconds=outcome.seconds, shards=shards, shard_sha256=sha256,
            updated_at=time.time()))

    def mark_done(self, outcome: SlideOutcome, shard: str | None, sha256: str | None) -> None:
        self._record(outcome, "done", [shard] if shard else [], [sha256] if sha256 else [])

    def mark_failed(self, outcome: SlideOutcome) -> None:
        self._record(outcome, "failed", [], [])

    def reset(self, slide_ids: Iterable[str]) -> None:
        """Back to pending (a retried failure, or a slide whose shard was lost before it was committed)."""
        for sid in slide_ids:
            self._set(sid, dict(status="pending", reason="", n_tiles=0, bytes=0, shards=[], shard_sha256=[]))

    def count_attempt(self, slide_id: str) -> int:
        attempts = int(self.rows[slide_id]["attempts"] or 0) + 1
        self._set(slide_id, {"attempts": attempts})
        return attempts

