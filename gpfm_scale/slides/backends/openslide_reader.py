"""OpenSlide backend (openslide-python + openslide-bin): the widest format support (SVS, NDPI, MRXS, SCN, ...).

OpenSlide returns RGBA with transparent pixels outside the slide; we composite onto white so every backend gives
the same RGB.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.backends._common import one_line, rgba_on_white
from gpfm_scale.slides.backends.openslide_api import OpenSlideApiReader
from gpfm_scale.slides.reader import SLIDE_READERS


@SLIDE_READERS.register("openslide")
class OpenSlideReader(OpenSlideApiReader):
    """`openslide.OpenSlide` reader; MPP from `openslide.mpp-x`, magnification from `openslide.objective-power`."""

    name = "openslide"

    def _open(self, path: str) -> Any:
        try:
            import openslide
        except ImportError as exc:
            raise SlideReadError(f"openslide: openslide-python/openslide-bin not installed ({one_line(exc)})") from exc
        return openslide.OpenSlide(path)

    def _read(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return rgba_on_white(np.asarray(self._slide.read_region(loc, level, size)))
