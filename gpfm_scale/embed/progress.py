"""The embedding progress bar, in images, advanced as each result block reaches the driver.

Before the first block the inference actors are still loading their model and the read tasks decoding their first
tiles (minutes on a cold cluster); the bar says so instead of sitting at 0/N. A block is one predictor batch
(`batch_size` images, fewer at a shard's end): the finest step the driver sees without smaller forward passes.
"""

from __future__ import annotations

import time

from tqdm import tqdm

STARTING, RUNNING = "embedding (starting inference actors)", "embedding"


class EmbedProgress:
    """`total` images (None: unknown); `advance` per result block with its counts and a note (e.g. slides done)."""

    def __init__(self, total: int | None) -> None:
        self.bar = tqdm(total=total, unit="img", desc=STARTING, dynamic_ncols=True)  # drawn at once
        self.embedded, self._t0 = 0, time.perf_counter()

    def advance(self, n_ok: int, n_bad: int, note: str) -> float:
        """Count a block of `n_ok` embedded and `n_bad` corrupt images; returns the embedded images/s so far."""
        if self.bar.n == 0:
            self.bar.set_description_str(RUNNING, refresh=False)
        self.embedded += n_ok
        rate = self.embedded / max(time.perf_counter() - self._t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:.0f} img/s {note}", refresh=False)
        self.bar.update(n_ok + n_bad)
        return rate

    def close(self) -> None:
        self.bar.close()
