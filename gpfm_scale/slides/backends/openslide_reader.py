"""OpenSlide backend (openslide-python + openslide-bin): the widest format support (SVS, NDPI, MRXS, SCN, ...).

OpenSlide returns RGBA with transparent pixels outside the slide; we composite onto white so every backend gives
the same RGB. Decoding is CPU-only, so `device` is accepted for a uniform constructor and otherwise ignored.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.backends._common import (
    BackendReader,
    backend_errors,
    one_line,
    positive_float,
    rgba_on_white,
)
from gpfm_scale.slides.reader import SLIDE_READERS

logger = logging.getLogger(__name__)


@SLIDE_READERS.register("openslide")
class OpenSlideReader(BackendReader):
    """`openslide.OpenSlide` reader; MPP from `openslide.mpp-x`, magnification from `openslide.objective-power`."""

    name = "openslide"

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu") -> None:
        super().__init__(path)
        if device != "cpu":
            logger.debug("openslide decodes on the CPU; device %r ignored for %s", device, self.path)
        try:
            import openslide
        except ImportError as exc:
            raise SlideReadError(f"openslide: openslide-python/openslide-bin not installed ({one_line(exc)})") from exc
        self._slide: Any = None  # the library is imported lazily, so its type is not named here
        with backend_errors(self.name, self.path, "open"):
            self._slide = openslide.OpenSlide(self.path)
            self._dims = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
            self._downsamples = [float(d) for d in self._slide.level_downsamples]
            self._props = dict(self._slide.properties)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._dims)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._downsamples)

    @property
    def mpp(self) -> float | None:
        return positive_float(self._props.get("openslide.mpp-x"))

    @property
    def magnification(self) -> float | None:
        return positive_float(self._props.get("openslide.objective-power"))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        self.check_request(level, size)
        loc = (int(location[0]), int(location[1]))
        blank = self.blank_if_outside(loc, level, size)
        if blank is not None:
            return blank
        with backend_errors(self.name, self.path, f"read level {level} at {loc}"):
            rgba = np.asarray(self._slide.read_region(loc, level, (int(size[0]), int(size[1]))))
        return self.finish(rgba_on_white(rgba), loc, level)

    def close_backend(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None
