"""The run manifest: one durable row per slide saying what happened to it.

A slide is `pending` until the shard holding its tiles has been renamed into place, then `done`; or `failed` with
a one-line reason. A done slide with no tiles (no tissue, or no tile fits) says why in `reason` ("no tiles: ...").
The manifest is rewritten atomically (temporary file + rename) after every commit, so a driver killed at any
moment leaves either the old or the new manifest, never a torn one. Rows carry the input manifest's extra
(clinical) columns through unchanged.

Rows are never dropped: a slide of an earlier run that is missing from this run's input (a subset manifest, a file
moved away) keeps its row, status and shards untouched, with `in_input` False, so its tiles stay in the dataset.
`attempts` counts every time the slide was handed to a tiling actor, over all runs into the directory (a slide
redone after a lost actor or an interrupted run counts again; a slide refused before dispatch, e.g. for an invalid
manifest mpp, has 0).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling.outputs import OutputDir

MANIFEST_NAME = "manifest.parquet"
STATUSES = ("pending", "done", "failed")
COLUMNS = [
    "slide_id", "path", "status", "reason", "n_tiles", "bytes", "mpp", "mpp_source", "magnification", "reader",
    "zero_decode", "shards", "shard_sha256", "seconds", "attempts", "in_input", "updated_at",
]


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
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _listed(row: dict[str, Any]) -> bool:
    """In this run's input (rows of manifests written before the column existed count as listed)."""
    value = row.get("in_input")
    return value is None or bool(value)


class RunManifest:
    def __init__(self, rows: dict[str, dict[str, Any]], extra_columns: list[str]) -> None:
        self.rows = rows
        self.extra_columns = extra_columns

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
        return cls(rows, extra)

    @classmethod
    def load(cls, out: OutputDir) -> "RunManifest | None":
        if not out.exists(MANIFEST_NAME):
            return None
        try:
            df = pd.read_parquet(io.BytesIO(out.read_bytes(MANIFEST_NAME)))
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"{out.path(MANIFEST_NAME)} is not a readable run manifest ({type(err).__name__}); "
                              "restore it from a backup or use a new --out") from None
        missing = {"slide_id", "status", "shards"} - set(df.columns)
        if missing:
            raise ConfigError(f"{out.path(MANIFEST_NAME)} is not a tiling run manifest (no {sorted(missing)} "
                              "column): use a new --out")
        rows = {}
        for rec in df.to_dict("records"):
            rec["shards"] = list(rec.get("shards") if rec.get("shards") is not None else [])
            rec["shard_sha256"] = list(rec.get("shard_sha256") if rec.get("shard_sha256") is not None else [])
            rows[rec["slide_id"]] = rec
        return cls(rows, [c for c in df.columns if c not in COLUMNS])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows.values()), columns=COLUMNS + self.extra_columns)

    def save(self, out: OutputDir) -> None:
        buf = io.BytesIO()
        self.to_frame().to_parquet(buf, index=False)
        out.write_bytes_atomic(buf.getvalue(), MANIFEST_NAME)

    def with_status(self, *statuses: str) -> list[str]:
        return [sid for sid, r in self.rows.items() if r["status"] in statuses]

    def in_input(self) -> list[str]:
        return [sid for sid, r in self.rows.items() if _listed(r)]

    def absent(self) -> list[str]:
        """Slides of earlier runs that are not in this run's input (kept, never touched)."""
        return [sid for sid, r in self.rows.items() if not _listed(r)]

    def referenced_shards(self) -> set[str]:
        """Every shard any row names, whatever its status or input: none of these may ever be deleted."""
        return {s for r in self.rows.values() for s in r["shards"]}

    def _record(self, outcome: SlideOutcome, status: str) -> None:
        row = self.rows[outcome.slide_id]
        row.update(status=status, reason=outcome.reason, n_tiles=outcome.n_tiles, bytes=outcome.bytes,
                   mpp=outcome.mpp, mpp_source=outcome.mpp_source, magnification=outcome.magnification,
                   reader=outcome.reader, zero_decode=outcome.zero_decode, seconds=outcome.seconds,
                   updated_at=time.time())

    def mark_done(self, outcome: SlideOutcome, shard: str | None, sha256: str | None) -> None:
        self._record(outcome, "done")
        self.rows[outcome.slide_id].update(shards=[shard] if shard else [], shard_sha256=[sha256] if sha256 else [])

    def mark_failed(self, outcome: SlideOutcome) -> None:
        self._record(outcome, "failed")
        self.rows[outcome.slide_id].update(shards=[], shard_sha256=[])

    def reset(self, slide_ids: Iterable[str]) -> None:
        """Back to pending (a retried failure, or a slide whose shard was lost before it was committed)."""
        for sid in slide_ids:
            self.rows[sid].update(status="pending", reason="", n_tiles=0, bytes=0, shards=[], shard_sha256=[])

    def count_attempt(self, slide_id: str) -> int:
        self.rows[slide_id]["attempts"] = int(self.rows[slide_id]["attempts"] or 0) + 1
        return self.rows[slide_id]["attempts"]
