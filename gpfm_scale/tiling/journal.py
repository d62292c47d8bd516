"""The run manifest's commit log, writing side (replay and the format's names: `contracts/run_manifest.py`): small
append-only records, so a commit costs O(1) instead of a manifest rewrite.

Why: rewriting manifest.parquet at every shard commit costs ~0.6 s at 86k rows (issue 12.1), which caps the
driver at ~2 commits/s. Instead each commit appends one JSON line; the state is
    manifest.parquet (its key-value metadata says through which journal segment it is compacted)
    + every record of `journal/{seq:09d}.jsonl` with seq above that, applied in order.
Layout and durability:
- local: the driver appends to one segment and fsyncs it per record, so a record is durable when `append` returns;
  a crash mid-write can only leave the segment's last line without its newline: replay ignores such a torn line
  (its commit never happened) and refuses any other unreadable line.
- object stores (no append): every record is its own object `journal/{seq}.jsonl`, written whole (a PUT is atomic).
- compaction writes manifest.parquet atomically with `journal_through` = the last segment it holds, then deletes
  those segments; a crash in between leaves segments that replay skips (seq <= journal_through).
A record is one line, so a commit touching several slides (one shard) is all-or-nothing. Records only set fields
(`{"set": {slide_id: {field: value}}}`) or reserve shard names (`{"reserve": [run, lo, hi]}`), so applying one
twice is harmless.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.run_manifest import JOURNAL_DIR, segments


def _plain(value: Any) -> Any:
    """json.dumps fallback: numpy scalars and arrays (parquet round trips give those) as plain Python."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, default=_plain, separators=(",", ":")).encode() + b"\n"


class Journal:
    """The append side: one segment per driver epoch (local, fsynced per record) or one object per record."""

    def __init__(self, out: OutputDir, seq: int) -> None:
        self.out, self.seq = out, seq
        self.out.fs.makedirs(out.path(JOURNAL_DIR), exist_ok=True)
        self._file = open(self._path(), "ab") if out.is_local else None

    def _path(self) -> str:
        return self.out.path(JOURNAL_DIR, f"{self.seq:09d}.jsonl")

    def append(self, record: dict[str, Any]) -> None:
        """Durable when this returns: the commit point of everything `record` says."""
        data = encode(record)
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
            os.fdatasync(self._file.fileno())
        else:
            self.out.fs.pipe_file(self._path(), data)
            self.seq += 1

    def roll(self) -> int:
        """Close the current segment and start the next; returns the last seq written (what a compaction holds)."""
        last = self.seq if self._file is not None else self.seq - 1
        if self._file is not None:
            self._file.close()
        self.seq = last + 1
        self._file = open(self._path(), "ab") if self.out.is_local else None
        return last

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def prune(self, through: int) -> None:
        """Delete segments a compaction holds (replay skips them anyway; this only frees the space)."""
        for seq, path in segments(self.out).items():
            if seq <= through:
                self.out.fs.rm(path)
