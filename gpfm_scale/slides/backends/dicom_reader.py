"""DICOM whole-slide images (VL Whole Slide Microscopy Image IOD) through wsidicom: how IDC serves TCGA.

A slide is one DICOM series: a folder of .dcm files (one per pyramid level, plus label/overview instances that
wsidicom sets aside), or one .dcm file of it, whose siblings of the same series are then opened with it. Before
wsidicom sees anything, each file's header is checked with pydicom, so a .dcm that is not a slide (a CT slice, a
structured report) fails with its SOP class, not a TIFF message or wsidicom's "no files found".

Geometry follows the DICOM pixel spacing: mpp is the base level's column spacing (mm -> µm), a level's downsample
is its spacing over the base's. wsidicom reads in a level's own pixels and refuses regions past the level, so a
request is clipped to the level and the rest filled white, as every backend here does.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.backends._common import BackendReader, backend_errors, one_line, positive_float
from gpfm_scale.slides.reader import SLIDE_READERS, RawTileLayout

logger = logging.getLogger(__name__)

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage."""
_HEADER_TAGS = ["SOPClassUID", "SeriesInstanceUID", "OpticalPathSequence"]


def _is_dcm_name(name: str) -> bool:
    return name.lower().endswith(".dcm")


def _has_dicm_magic(path: str) -> bool:
    """DICOM Part 10 files carry b'DICM' after a 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_path(path: str) -> bool:
    """True for a .dcm file (or one with the DICM magic) and for a folder holding .dcm files (one slide)."""
    if os.path.isdir(path):
        return any(_is_dcm_name(n) for n in os.listdir(path))
    return _is_dcm_name(path) or (os.path.isfile(path) and _has_dicm_magic(path))


def _header(path: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SlideReadError(f"dicom: {path} is not a readable DICOM file: {one_line(exc)}") from exc


def _sop_class(header: Any) -> str:
    uid = header.get("SOPClassUID")
    if uid is None:
        return "none given"
    name = getattr(uid, "name", str(uid))
    return f"{name} ({uid})" if name != str(uid) else str(uid)


def series_files(path: str) -> dict[str, Any]:
    """Headers by file of the slide at `path` (a folder of one series, or one file and its same-series siblings).

    Raises SlideReadError when no file is a whole-slide image (naming the SOP class found) or a folder mixes
    several slides.
    """
    if os.path.isdir(path):
        candidates = sorted(os.path.join(path, n) for n in os.listdir(path) if _is_dcm_name(n))
        headers = {p: _header(p) for p in candidates}
    else:
        header = _header(path)
        if header.get("SOPClassUID") != WSI_SOP_CLASS:
            raise SlideReadError(f"dicom: not a DICOM whole-slide image: SOP class {_sop_class(header)}")
        folder = os.path.dirname(os.path.abspath(path))
        siblings = sorted(os.path.join(folder, n) for n in os.listdir(folder) if _is_dcm_name(n))
        headers = {p: _header(p) for p in siblings if p != os.path.abspath(path)}
        headers = {os.path.abspath(path): header, **headers}
    slides = {p: h for p, h in headers.items() if h.get("SOPClassUID") == WSI_SOP_CLASS}
    if not slides:
        found = sorted({_sop_class(h) for h in headers.values()})
        raise SlideReadError(f"dicom: not a DICOM whole-slide image: SOP class {', '.join(found)}")
    series = {str(h.get("SeriesInstanceUID")) for h in slides.values()}
    if os.path.isdir(path) and len(series) > 1:
        raise SlideReadError(f"dicom: {path} holds {len(series)} whole-slide series; give one folder per slide")
    first = str(next(iter(slides.values())).get("SeriesInstanceUID"))
    return {p: h for p, h in slides.items() if str(h.get("SeriesInstanceUID")) == first}


def objective_power(headers: Any) -> float | None:
    """ObjectiveLensPower of the series' optical path (the same for every level), or None when not stated."""
    for header in headers:
        for path in header.get("OpticalPathSequence") or []:
            power = positive_float(path.get("ObjectiveLensPower"))
            if power is not None:
                return power
    return None


@SLIDE_READERS.register("dicom")
class DicomReader(BackendReader):
    """wsidicom `WsiDicom` reader of one DICOM WSI series; decoding is CPU-only (`device` is ignored)."""

    name = "dicom"

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu") -> None:
        super().__init__(path)
        try:
            from wsidicom import WsiDicom
        except ImportError as exc:
            raise SlideReadError(f"dicom: wsidicom is not installed ({one_line(exc)})") from exc
        self._wsi: Any = None  # wsidicom is imported lazily, so its type is not named here
        headers = series_files(self.path)
        self._magnification = objective_power(headers.values())
        with backend_errors(self.name, self.path, "open"):
            self._wsi = WsiDicom.open(list(headers))
            levels = list(self._wsi.levels.levels)
            base = levels[0].pixel_spacing.width
            self._level_numbers = [int(level.level) for level in levels]
            self.set_levels([(level.size.width, level.size.height) for level in levels],
                            [level.pixel_spacing.width / base for level in levels])
            self._mpp = positive_float(levels[0].mpp.width)

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def magnification(self) -> float | None:
        return self._magnification

    def _read(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """wsidicom reads only inside the level: the part inside is read and placed on white."""
        ds = self._downsamples[level]
        x, y = math.floor(loc[0] / ds), math.floor(loc[1] / ds)
        width, height = self._dims[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + int(size[0]), width), min(y + int(size[1]), height)
        out = np.full((int(size[1]), int(size[0]), 3), 255, np.uint8)
        part = np.asarray(self._wsi.read_region((x0, y0), self._level_numbers[level], (x1 - x0, y1 - y0),
                                                as_array=True))
        if part.ndim == 2:  # a grey (MONOCHROME2) slide
            part = np.repeat(part[..., None], 3, axis=2)
        out[y0 - y:y1 - y, x0 - x:x1 - x] = part[..., :3]
        return out

    def raw_tile_layout(self, level: int) -> RawTileLayout | None:
        """None: the zero-decode path copies TIFF tiles; DICOM frames are not read that way (yet)."""
        return None

    def close_backend(self) -> None:
        wsi = getattr(self, "_wsi", None)
        if wsi is not None:
            wsi.close()
            self._wsi = None
