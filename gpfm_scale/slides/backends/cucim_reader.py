"""cuCIM backend: the fastest reader here (~1,100-1,300 224-px reads/s per CPU thread; GPU decode with device="cuda").

cuCIM is imported when a reader is built, not when this module is imported, so the registry lists the backend even
where the package is missing and `open_slide` reports that it is not installed (and which extra brings it) as that
backend's reason; the first time in a process it also warns, as the next reader in `readers` then reads the slides.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gpfm_scale.errors import SlideReadError
from gpfm_scale.extras import missing_extra
from gpfm_scale.slides.backends._common import (
    BackendReader,
    backend_errors,
    one_line,
    positive_float,
)
from gpfm_scale.slides.reader import SLIDE_READERS

logger = logging.getLogger(__name__)

_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}
"""Micrometres per TIFF ResolutionUnit, as cuCIM spells the unit in metadata['tiff']['resolution_unit']."""


def cucim_mpp(metadata: dict[str, Any]) -> float | None:
    """µm per level-0 px from cuCIM metadata: Aperio `MPP` first, then TIFF resolution tags, else None.

    cuCIM's `spacing()` reads only the resolution tags and reports [1, 1] when they are absent (the real CMU SVS),
    so a resolution of exactly 1 pixel per unit is treated as a missing tag, never as 10,000 or 25,400 µm/px.
    """
    mpp = positive_float((metadata.get("aperio") or {}).get("MPP"))
    if mpp is not None:
        return mpp
    tiff = metadata.get("tiff") or {}
    um_per_unit = _UM_PER_UNIT.get(str(tiff.get("resolution_unit", "")).strip().lower())
    resolution = positive_float(tiff.get("x_resolution"))
    if um_per_unit is None or resolution is None or resolution == 1.0:
        return None
    return um_per_unit / resolution


@functools.cache
def _warn_once(reason: str) -> None:
    """Say once per process that slides go to the next reader in `readers` (the one used is recorded per slide)."""
    logger.warning("%s; slides are read by the next reader in the readers list", reason)


@SLIDE_READERS.register("cucim")
class CucimReader(BackendReader):
    """cuCIM `CuImage` reader. device: "cpu" or "cuda" (GPU JPEG decode; results are copied back to host).

    num_workers: cuCIM threads for batch reads (`read_regions`); cuCIM needs at least 1 for a list of locations.
    """

    name = "cucim"

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", num_workers: int = 1) -> None:
        super().__init__(path)
        if device not in ("cpu", "cuda"):
            raise SlideReadError(f"cucim: device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.num_workers = max(1, num_workers)
        try:
            from cucim import CuImage  # type: ignore[attr-defined]
        except ImportError as exc:
            reason = f"cucim: {missing_extra('cucim', 'gpu', 'the cucim reader', exc)}"
            _warn_once(reason)
            raise SlideReadError(reason) from exc
        self._image: Any = None  # cucim is imported lazily, so its type is not named here
        with backend_errors(self.name, self.path, "open"):
            self._image = CuImage(self.path)
            res = self._image.resolutions
            self.set_levels(res["level_dimensions"], res["level_downsamples"])
            metadata = self._image.metadata
            self._metadata = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
        if device == "cuda":
            self._check_cuda()

    def _check_cuda(self) -> None:
        """Decode one pixel on the GPU now, so a machine without one fails at open with a clear reason."""
        try:
            import cupy  # noqa: F401 - needed to bring GPU results back to host
        except ImportError as exc:
            raise SlideReadError(f"cucim: {missing_extra('cupy', 'gpu', 'device cuda', exc)}") from exc
        try:
            self._to_host(self._image.read_region((0, 0), (1, 1), 0, device="cuda"))
        except Exception as exc:
            raise SlideReadError(f"cucim: device 'cuda' unavailable for {self.path}: {one_line(exc)}") from exc

    def _to_host(self, image: Any) -> np.ndarray:
        """An owned host copy of a cuCIM result (its buffers are borrowed and freed by cuCIM)."""
        if self.device == "cuda":
            import cupy

            return cupy.asnumpy(cupy.asarray(image))
        return np.array(image, copy=True)

    @property
    def mpp(self) -> float | None:
        return cucim_mpp(self._metadata)

    @property
    def magnification(self) -> float | None:
        return positive_float((self._metadata.get("aperio") or {}).get("AppMag"))

    def _read(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return self._to_host(self._image.read_region(loc, size, level, device=self.device))[..., :3]

    def read_regions(
        self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int], batch_size: int = 32
    ) -> Iterator[np.ndarray]:
        """cuCIM's batch iterator; each batch is copied before the iterator advances (its buffer is borrowed)."""
        self.check_request(level, size)
        locs = [(int(x), int(y)) for x, y in locations]
        if not locs:
            return
        w, h = int(size[0]), int(size[1])
        with backend_errors(self.name, self.path, f"batch-read level {level}"):
            batches = self._image.read_region(
                locs, (w, h), level, batch_size=max(1, batch_size), num_workers=self.num_workers, device=self.device
            )
        done = 0
        while done < len(locs):
            with backend_errors(self.name, self.path, f"batch-read level {level} near {locs[done]}"):
                batch = self._to_host(next(batches)).reshape(-1, h, w, 3)
            for region in batch:
                yield self.finish(region, locs[done], level)
                done += 1

    def close_backend(self) -> None:
        image = getattr(self, "_image", None)
        if image is not None:
            image.close()
            self._image = None
