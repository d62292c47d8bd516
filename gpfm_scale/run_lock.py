"""One run at a time per output directory.

Two runs writing one `--out` corrupt it in ways no resume can repair (a tiling run deletes the other's temporary
shard, both pick the same next shard index, a rename overwrites a committed shard). Every stage takes this lock
on its output directory before it reads or cleans anything there, and holds it to the end.

Local (and NFS) directories use `flock` on `DIR/.gpfm.lock`: the kernel drops it when the holder dies however it
dies, so a killed run never leaves a stale lock. The file also holds who took it (stage, host, pid, time,
command) so that a refused run can name the holder. Object stores have no such primitive: there the lock is a
lease object that a run writes and removes; one left by a killed run must be removed by hand, and the error says
which file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from types import TracebackType
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gpfm_scale.errors import ConfigError, OutputLockedError

LOCK_NAME = ".gpfm.lock"


def _holder(stage: str) -> dict[str, Any]:
    return {"stage": stage, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}


def _describe(raw: bytes | str) -> str:
    try:
        h = json.loads(raw)
        return (f"`gpfm-scale {h.get('stage')}` (pid {h.get('pid')} on {h.get('host')}, since {h.get('since')}; "
                f"command: {h.get('command')})")
    except (ValueError, TypeError, AttributeError):
        return "another process (its lock file names no holder)"


class OutputLock:
    """`with OutputLock(out_url, "tile"):` holds `out_url` exclusively; raises OutputLockedError if taken."""

    def __init__(self, url: str, stage: str) -> None:
        self.url = url.rstrip("/")
        self.stage = stage
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._fd: int | None = None
        self._lease = False

    @property
    def path(self) -> str:
        return f"{self.root}/{LOCK_NAME}"

    def acquire(self) -> "OutputLock":
        if self.is_local:
            self._acquire_local()
        else:
            self._acquire_remote()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"--out {self.url} is a file, not a directory")
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ConfigError(f"cannot write to --out {self.url}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = _describe(os.pread(fd, 65536, 0))
            os.close(fd)
            raise OutputLockedError(f"{self.url} is in use by {held_by}; wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(self.stage)).encode(), 0)
        self._fd = fd

    def _acquire_remote(self) -> None:
        if self.fs.exists(self.path):
            with self.fs.open(self.path, "rb") as f:
                held_by = _describe(f.read())
            raise OutputLockedError(f"{self.url} is in use by {held_by}; if that run is gone (killed), delete "
                                    f"{self.url}/{LOCK_NAME} and rerun")
        with self.fs.open(self.path, "wb") as f:
            f.write(json.dumps(_holder(self.stage)).encode())
        self._lease = True

    def release(self) -> None:
        if self.is_local:
            if self._fd is not None:
                os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new holder)
                self._fd = None
        elif self._lease:
            self.fs.rm(self.path)
            self._lease = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
