"""The tiling progress report, advanced as each slide's result reaches the driver, on either dispatch path
(`stage._dispatch` over Ray actors, `local.dispatch_in_process`): a tqdm bar over slides whose postfix shows tiles,
tiles/s and failed slides, and the `gpfm_tiling_tiles_per_second` gauge (the same rate, for Prometheus).

Tiles count when their slide is accepted, not when its shard commits (a shard holds several slides), so the rate
moves with every slide; the manifest, not this, is the record of what is done.
"""

from __future__ import annotations

import time
from types import TracebackType

from tqdm import tqdm

from gpfm_scale.metrics import TILING


class TilingProgress:
    """`total` slides to tile; `slide_done` per accepted result, `redo` when slides go back to pending. A context
    manager: the bar is closed however the loop ends."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, unit="slide", desc="tiling", dynamic_ncols=True)
        self.tiles, self._t0 = 0, time.perf_counter()

    def slide_done(self, n_tiles: int, n_failed: int) -> None:
        """A slide's result with `n_tiles` tiles; `n_failed` slides of the run have failed so far."""
        self.tiles += n_tiles
        elapsed = time.perf_counter() - self._t0
        rate = self.tiles / elapsed if elapsed > 0 else 0.0  # tiles/s over the run so far
        TILING.tiles_per_second.set(rate)
        self.bar.update(1)
        self.bar.set_postfix(tiles=self.tiles, tiles_per_s=f"{rate:.0f}", failed=n_failed)

    def redo(self, n_slides: int) -> None:
        """`n_slides` more results to wait for: slides a dead process took with it are tiled again."""
        self.bar.total += n_slides

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> TilingProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
