"""The pretraining progress bar: one tqdm over steps, on rank 0 only (Ray forwards a worker's stderr to the driver).

The bar advances every step without touching the device; its loss and images/s are updated only where the loop
already has them as floats (a metrics step), so it adds no host sync.
"""

from __future__ import annotations

from tqdm import tqdm


def step_bar(total: int, start: int, enabled: bool) -> tqdm:
    """Steps `start`..`total` (a resumed run starts part-way); `enabled` false (ranks > 0) draws nothing."""
    return tqdm(total=total, initial=start, unit="step", desc="pretraining", dynamic_ncols=True,
                disable=not enabled)


def show_metrics(bar: tqdm, loss: float, images_per_s: float) -> None:
    """Loss (the total objective) and images/s (the whole run's) of the latest metrics step, in the bar's postfix."""
    bar.set_postfix_str(f"loss {loss:.4f}, {images_per_s:.1f} img/s")

