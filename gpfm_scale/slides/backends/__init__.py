"""Slide-reader backends; importing this package registers each one in `SLIDE_READERS`.

Each backend imports its library only when a reader is built, so all of them are always registered and a missing
library becomes that backend's reason in `open_slide`'s error rather than an import error here.
"""

from gpfm_scale.slides.backends.cucim_reader import CucimReader
from gpfm_scale.slides.backends.dicom_reader import DicomReader
from gpfm_scale.slides.backends.openslide_reader import OpenSlideReader
from gpfm_scale.slides.backends.tiffslide_reader import TiffSlideReader

__all__ = ["CucimReader", "DicomReader", "OpenSlideReader", "TiffSlideReader"]
