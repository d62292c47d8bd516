"""The tiling progress report both dispatch loops share (`progress.TilingProgress`): the bar counts slides and
redone slides, its postfix and the Prometheus gauge show the same tiles/s."""

from __future__ import annotations

from gpfm_scale.metrics.definitions import DRIVER_REGISTRY
from gpfm_scale.tiling.progress import TilingProgress


def _gauge() -> float:
    return DRIVER_REGISTRY.get_sample_value("gpfm_tiling_tiles_per_second")


def test_slides_and_redone_slides_advance_the_bar_and_the_gauge():
    with TilingProgress(2) as progress:
        progress.slide_done(40, n_failed=0)
        progress.redo(1)  # a dead process's slide is tiled again: one more result to wait for
        progress.slide_done(0, n_failed=1)
        bar = progress.bar
        assert (bar.n, bar.total, progress.tiles) == (2, 3, 40)
        postfix = dict(part.split("=") for part in bar.postfix.split(", "))
        assert (postfix["tiles"], postfix["failed"]) == ("40", "1")
        assert _gauge() > 0 and int(postfix["tiles_per_s"]) == round(_gauge())
    assert bar.disable  # closed on leaving the block
