"""tiffslide backend: pure Python (tifffile + zarr + imagecodecs), the OpenSlide API without a C library.

tiffslide pads reads outside the slide with black; `finish` turns those pixels white like the other backends.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.backends._common import one_line
from gpfm_scale.slides.backends.openslide_api import OpenSlideApiReader
from gpfm_scale.slides.reader import SLIDE_READERS


@SLIDE_READERS.register("tiffslide")
class TiffSlideReader(OpenSlideApiReader):
    """`tiffslide.TiffSlide` reader; MPP from `tiffslide.mpp-x`, magnification from `tiffslide.objective-power`."""

    name = "tiffslide"

    def _open(self, path: str) -> Any:
        try:
            import tiffslide
        except ImportError as exc:
            raise SlideReadError(f"tiffslide: tiffslide is not installed ({one_line(exc)})") from exc
        return tiffslide.TiffSlide(path)

    def _read(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return np.array(self._slide.read_region(loc, level, size, as_array=True))[..., :3]
