"""The run manifest of a tiling output, as its readers see it: one durable row per slide (DESIGN.md "Run manifest").

The state is `manifest.parquet` (columns `COLUMNS`, plus the input manifest's extra clinical columns carried
through) and the journal records after it (`journal/{seq:09d}.jsonl`, one JSON record per line, each only setting
fields `{"set": {slide_id: {field: value}}}` or reserving shard names `{"reserve": [run, lo, hi]}`). The parquet's
key-value metadata `META_KEY` says through which journal segment it is compacted. Read it with `read_state`, never
the parquet alone: a running (or killed) tiling run commits by journal append, so the parquet lags behind.

A row's `status` is one of `STATUSES`; `shards` lists the shard names under `shards/` holding its tiles. The tiling
stage owns the writing side (`tiling/manifest.py`, `tiling/journal.py`); `embed` and tests read through here.
"""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any, Iterator, Self

import pandas as pd
import pyarrow.parquet as pq

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
STATUSES = ("pending", "done", "failed")
COLUMNS = [
    "slide_id", "path", "status", "reason", "n_tiles", "bytes", "mpp", "mpp_source", "magnification", "reader",
    "zero_decode", "shards", "shard_sha256", "seconds", "attempts", "in_input", "updated_at",
]
META_KEY = b"gpfm_journal"
"""Parquet key-value metadata: {"through": last journal seq compacted in, "reserved": [[run, lo, hi], ...]}."""
JOURNAL_DIR = "journal"
SEGMENT_RE = re.compile(r"^(?P<seq>\d{9})\.jsonl$")


def listed(row: dict[str, Any]) -> bool:
    """In this run's input (rows of manifests written before the column existed count as listed)."""
    value = row.get("in_input")
    return value is None or bool(value)


def segments(out: OutputDir) -> dict[int, str]:
    """Journal segment seq -> its path under `out` (empty when there is no journal)."""
    where = out.path(JOURNAL_DIR)
    if not out.fs.exists(where):
        return {}
    found = {}
    for p in out.fs.ls(where, detail=False):
        m = SEGMENT_RE.match(p.rsplit("/", 1)[-1])
        if m:
            found[int(m.group("seq"))] = p
    return found


def replay(out: OutputDir, through: int) -> Iterator[dict[str, Any]]:
    """The records of every segment after `through`, oldest first; a torn last line of a segment is skipped."""
    found = segments(out)
    for seq in sorted(s for s in found if s > through):
        with out.fs.open(found[seq], "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the segment ends with a newline, i.e. its last record is complete
        if torn:
            log.warning("ignoring the torn last record of %s (%d bytes): a driver was killed while writing it; "
                        "its commit never happened", found[seq], len(torn))
        for n, line in enumerate(lines, 1):
            try:
                yield json.loads(line)
            except ValueError:
                raise ConfigError(f"{found[seq]} line {n} is not a journal record: the run manifest is damaged; "
                                  "restore it from a backup or use a new --out") from None


class ManifestState:
    """Rows by slide id, the extra (input manifest) columns, the shard-index ranges reserved for actors, and the
    journal segment the parquet is compacted through."""

    def __init__(self, rows: dict[str, dict[str, Any]], extra_columns: list[str],
                 reserved: list[list[Any]] | None = None, through: int = -1) -> None:
        self.rows = rows
        self.extra_columns = extra_columns
        self.reserved = reserved or []
        self.through = through

    def _set(self, slide_id: str, fields: dict[str, Any]) -> None:
        self.rows[slide_id].update(fields)

    def apply(self, record: dict[str, Any]) -> None:
        """Replay one journal record; records of slides this state lacks cannot come from it."""
        for sid, fields in record.get("set", {}).items():
            if sid not in self.rows:
                raise ConfigError(f"the journal names slide {sid!r}, which its manifest lacks: the run manifest "
                                  "is damaged; restore it from a backup or use a new --out")
            self._set(sid, fields)
        if "reserve" in record:
            self.reserve(*record["reserve"])

    def reserve(self, run: str, lo: int, hi: int) -> None:
        """Shard indices [lo, hi) of `run` may be published by actors: unreferenced ones are crash orphans."""
        for r in self.reserved:
            if r[0] == run and r[1] <= lo <= r[2]:
                r[2] = max(r[2], hi)
                return
        self.reserved.append([run, lo, hi])

    def is_reserved(self, run: str, index: int) -> bool:
        return any(r == run and lo <= index < hi for r, lo, hi in self.reserved)

    @classmethod
    def load(cls, out: OutputDir) -> Self | None:
        """The state: manifest.parquet, then every journal record after it (None when there is no manifest)."""
        if not out.exists(MANIFEST_NAME):
            return None
        try:
            table = pq.read_table(io.BytesIO(out.read_bytes(MANIFEST_NAME)))
            df = table.to_pandas()
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"{out.path(MANIFEST_NAME)} is not a readable run manifest ({type(err).__name__}); "
                              "restore it from a backup or use a new --out") from None
        missing = {"slide_id", "status", "shards"} - set(df.columns)
        if missing:
            raise ConfigError(f"{out.path(MANIFEST_NAME)} is not a tiling run manifest (no {sorted(missing)} "
                              "column): use a new --out")
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
        rows = {}
        for rec in df.to_dict("records"):
            rec["shards"] = list(rec.get("shards") if rec.get("shards") is not None else [])
            rec["shard_sha256"] = list(rec.get("shard_sha256") if rec.get("shard_sha256") is not None else [])
            rows[rec["slide_id"]] = rec
        state = cls(rows, [c for c in df.columns if c not in COLUMNS], meta.get("reserved"), meta.get("through", -1))
        for record in replay(out, state.through):
            state.apply(record)
        return state

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows.values()), columns=COLUMNS + self.extra_columns)


def read_state(out: str | OutputDir) -> pd.DataFrame | None:
    """The current manifest of a tiling output (compacted parquet + journal), one row per slide; None if none.

    The one way to read it while a run is going or after a killed one: manifest.parquet alone lags the journal."""
    state = ManifestState.load(out if isinstance(out, OutputDir) else OutputDir(out))
    return None if state is None else state.to_frame()


def extra_columns(manifest: pd.DataFrame) -> list[str]:
    """The input manifest's own columns (labels, clinical data) the tiler carried through."""
    return [c for c in manifest.columns if c not in COLUMNS]
