"""Readers for libraries with OpenSlide's API (OpenSlide itself, tiffslide): one implementation, two thin entries.

Both expose `level_dimensions`, `level_downsamples`, `properties` with `{prefix}.mpp-x` / `{prefix}.objective-power`
and `read_region`; they differ only in the library, the property prefix and how a read comes back (OpenSlide:
RGBA with transparent outside; tiffslide: RGB padded black outside, fixed by `finish`). Decoding is CPU-only, so
`device` is accepted for a uniform constructor and otherwise ignored.
"""

from __future__ import annotations

import abc
import logging
import os
from typing import Any


from gpfm_scale.slides.backends._common import BackendReader, backend_errors, positive_float

logger = logging.getLogger(__name__)


class OpenSlideApiReader(BackendReader):
    """Subclasses set `name` (also the property prefix) and implement `_open` and `_read`."""

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu") -> None:
        super().__init__(path)
        if device != "cpu":
            logger.debug("%s decodes on the CPU; device %r ignored for %s", self.name, device, self.path)
        self._slide: Any = None  # the library is imported lazily, so its type is not named here
        with backend_errors(self.name, self.path, "open"):
            self._slide = self._open(self.path)
            self.set_levels(self._slide.level_dimensions, self._slide.level_downsamples)
            self._props = dict(self._slide.properties)

    @abc.abstractmethod
    def _open(self, path: str) -> Any:
        """The library's slide object (raises SlideReadError when the library is missing)."""

    @property
    def mpp(self) -> float | None:
        return positive_float(self._props.get(f"{self.name}.mpp-x"))

    @property
    def magnification(self) -> float | None:
        return positive_float(self._props.get(f"{self.name}.objective-power"))

    def close_backend(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None
