"""The output directory of a tiling run, local or any fsspec URL, and its layout.

Everything is written under a temporary name and moved into place when complete, so a reader (or a rerun) never
sees half a file; local files get the mode `open()` would give (0666 minus the umask, `gpfm_scale.atomic`), not
mkstemp's 0600. Layout (DESIGN.md contracts):
    DIR/shards/{run}-{NNNNNN}.tar    WebDataset shards (whole slides only)
    DIR/shards/.tmp/                 shards being written; our temporary files there are cleared when a run starts
    DIR/coords/{slide_id}.h5         CLAM/TRIDENT coordinates
    DIR/thumbnails/{slide_id}.png    QC thumbnails (tissue mask and kept tiles drawn)
    DIR/manifest.parquet             the run manifest, compacted
    DIR/journal/{seq}.jsonl          its commit records since (`journal.py`)
    DIR/config.yaml                  the resolved config of the run
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gpfm_scale import atomic
from gpfm_scale.contracts.shards import SHARD_RE

TMP_RE = re.compile(r"^([0-9a-f]{32}\.tar|tmp\w+\.(h5|png))(\.partial)?$")
"""Names of the temporary files tiling makes in shards/.tmp (ShardWriter's uuid shards, mkstemp's coords and
thumbnails, and their remote `.partial` uploads): the only files a run removes there."""


class OutputDir:
    def __init__(self, url: str, staging_dir: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)
        self.staging_dir = staging_dir

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def makedirs(self) -> None:
        for sub in ("shards/.tmp", "coords", "thumbnails"):
            self.fs.makedirs(self.path(sub), exist_ok=True)

    def local_tmp_dir(self) -> str:
        """Where workers write shards: inside the output (same filesystem, rename is atomic) when local."""
        if self.is_local:
            return self.path("shards", ".tmp")
        base = self.staging_dir or tempfile.gettempdir()
        path = os.path.join(base, "gpfm-tiling-staging")
        os.makedirs(path, exist_ok=True)
        return path

    def publish(self, local_path: str, *parts: str) -> str:
        """Move a finished local file to `parts` under the output, atomically where the filesystem allows."""
        dest = self.path(*parts)
        if self.is_local:
            atomic.replace_into_place(local_path, dest)
        else:
            tmp = dest + ".partial"
            self.fs.put_file(local_path, tmp)
            self.fs.mv(tmp, dest)
            os.remove(local_path)
        return dest

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        dest = self.path(*parts)
        if self.is_local:
            atomic.write_bytes_atomic(dest, data)
        else:
            with self.fs.open(dest + ".partial", "wb") as f:
                f.write(data)
            self.fs.mv(dest + ".partial", dest)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as f:
            return f.read()

    def list_shards(self) -> dict[str, int]:
        """Final shard file name -> its index."""
        if not self.fs.exists(self.path("shards")):
            return {}
        out = {}
        for p in self.fs.ls(self.path("shards"), detail=False):
            name = Path(p).name
            m = SHARD_RE.match(name)
            if m:
                out[name] = int(m.group("index"))
        return out

    def clear_tmp(self) -> int:
        """Remove the temporary files a killed run of ours left in shards/.tmp (TMP_RE); returns how many.

        Safe because the caller holds the output lock: no other run is writing there. Anything else is left."""
        tmp = self.path("shards", ".tmp")
        if not self.fs.exists(tmp):
            return 0
        files = [p for p in self.fs.ls(tmp, detail=False) if TMP_RE.match(Path(p).name)]
        for p in files:
            self.fs.rm(p)
        return len(files)
