"""A fencing token on `pretrain --out`: workers of a run that lost --out to a newer run write nothing more there.

The driver's `OutputLock` keeps two drivers apart, but its workers are other processes, on other nodes: when a
driver is killed, its workers can live on for a while (mid-step, mid-save) and would then write a checkpoint or a
metrics row into a directory that a new run (which took the lock) now owns. So the driver, holding the lock,
writes a fresh generation id to `DIR/.generation` and hands it to its workers; before each write into DIR (a
checkpoint, a metrics row, the export) a worker reads the file again and stops if it names another generation.
On a bucket the file is one object, replaced whole by the new run's upload (`storage.write_bytes`).
This narrows the window to one file read before each write; it does not make the write itself atomic with it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from gpfm_scale import storage
from gpfm_scale.errors import GpfmError

log = logging.getLogger(__name__)

GENERATION_NAME = ".generation"


class SupersededRunError(GpfmError):
    """A newer run took over this run's --out; this worker must not write there (raised in workers only)."""


@dataclass(frozen=True)
class RunFence:
    """`out`'s run generation as this process knows it; `check` before every write into `out`."""

    out: str
    generation: str

    @property
    def path(self) -> str:
        return storage.join(self.out, GENERATION_NAME)

    @classmethod
    def start(cls, out: str) -> RunFence:
        """A new generation for `out`: only the driver that holds the OutputLock of `out` calls this."""
        fence = cls(out, uuid.uuid4().hex)
        storage.write_bytes(fence.path, fence.generation.encode())
        return fence

    def current(self) -> str | None:
        """The generation `out` belongs to now (None: no run has claimed it)."""
        try:
            return storage.read_bytes(self.path).decode("ascii").strip()
        except FileNotFoundError:
            return None

    def check(self, what: str) -> None:
        """Raise SupersededRunError (logged) if another run owns `out` now: the caller must not write `what`."""
        current = self.current()
        if current != self.generation:
            log.error("not writing %s: %s now belongs to run generation %s, not this run's %s (a newer run took it "
                      "over; this worker's driver is gone)", what, self.out, current, self.generation)
            raise SupersededRunError(f"{self.out} was taken over by run generation {current}; "
                                     f"this worker (generation {self.generation}) stopped without writing {what}")
