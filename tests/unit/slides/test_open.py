"""open_slide: backend order, fallback, probe, and one clear error listing every backend's reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpfm_scale.errors import ConfigError, SlideReadError
from gpfm_scale.slides.open import DEFAULT_READERS, open_slide
from gpfm_scale.slides.reader import SLIDE_READERS
from gpfm_scale.slides.synthetic import (
    truncate_file,
    write_corrupt_slide,
    write_synthetic_slide,
)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("open") / "slide.svs"
    return write_synthetic_slide(path, 1024, 768, mpp=0.5, tile=256, levels=2, seed=2)


@pytest.fixture()
def spy_readers(monkeypatch):
    """Two test-only readers: one refusing every slide, one wrapping OpenSlide; both record that they were tried."""
    tried: list[str] = []
    real = SLIDE_READERS.get("openslide")

    class Refuses(real):  # type: ignore[misc, valid-type]
        name = "refuses"

        def __init__(self, path, device="cpu"):
            tried.append(self.name)
            raise SlideReadError("refuses: cannot open: test reader refuses everything")

    class Accepts(real):  # type: ignore[misc, valid-type]
        name = "accepts"

        def __init__(self, path, device="cpu"):
            tried.append(self.name)
            super().__init__(path, device)

    monkeypatch.setitem(SLIDE_READERS._items, "refuses", Refuses)
    monkeypatch.setitem(SLIDE_READERS._items, "accepts", Accepts)
    return tried


def test_default_order_is_cucim_first(slide):
    assert DEFAULT_READERS == ("cucim", "openslide", "tiffslide")
    with open_slide(slide.path) as reader:
        assert reader.name == "cucim"
        assert reader.level_dimensions == [(1024, 768), (256, 192)]


def test_falls_back_in_order(slide, spy_readers):
    with open_slide(slide.path, readers=("refuses", "accepts", "tiffslide")) as reader:
        assert reader.name == "accepts"
    assert spy_readers == ["refuses", "accepts"]  # stops at the first that works


def test_fallback_on_a_format_one_backend_lacks(tmp_path):
    """OpenSlide refuses stripped (untiled) TIFFs; tiffslide reads them."""
    path = tmp_path / "stripped.tif"
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, photometric="rgb")
    with open_slide(str(path), readers=("openslide", "tiffslide")) as reader:
        assert reader.name == "tiffslide"
        np.testing.assert_array_equal(reader.read_level(0), pixels)


def test_cuda_without_gpu_falls_back_to_cpu_reader(slide):
    try:
        import cupy

        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver or no cupy: no GPU
        has_gpu = False
    with open_slide(slide.path, device="cuda") as reader:
        assert reader.name == ("cucim" if has_gpu else "openslide")


def _error(path, readers=DEFAULT_READERS) -> str:
    with pytest.raises(SlideReadError) as err:
        open_slide(str(path), readers=readers)
    return str(err.value)


def test_corrupt_file_lists_every_backend(tmp_path):
    message = _error(write_corrupt_slide(tmp_path / "corrupt.svs"))
    assert "no reader could open it" in message and "not a TIFF-based file" in message
    for name in DEFAULT_READERS:
        assert f"{name}: cannot open" in message
    assert message.index("cucim:") < message.index("openslide:") < message.index("tiffslide:")
    assert "\n" not in message


def test_text_file(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("slide_id,path\nA,a.svs\n")
    message = _error(path)
    assert "not a TIFF-based file: starts with b'slide_id'" in message
    assert all(f"{name}: cannot open" in message for name in DEFAULT_READERS)


def test_truncated_file(tmp_path, slide):
    path = tmp_path / "cut.svs"
    shutil.copy(slide.path, path)
    truncate_file(path, 0.6)
    message = _error(path)
    assert "truncated or damaged TIFF" in message and "beyond the file's" in message


def test_damaged_pixels_caught_by_probe(tmp_path, slide):
    """Same size, no truncation, but the last-stored tile of the lowest level is overwritten: every backend must
    refuse at open. cuCIM alone returns black for such a tile without raising; the probe's strict decode of the
    stored tile catches it."""
    with tifffile.TiffFile(slide.path) as tif:
        offset = int(tif.series[0].levels[-1].keyframe.dataoffsets[-1])
    data = bytearray(Path(slide.path).read_bytes())
    data[offset : offset + 64] = bytes(64)
    path = tmp_path / "damaged.svs"
    path.write_bytes(bytes(data))
    for name in DEFAULT_READERS:
        message = _error(path, readers=(name,))
        assert f"{name}: " in message and ("Not a JPEG file" in message or "SOI" in message), message


def test_missing_empty_and_directory(tmp_path):
    assert _error(tmp_path / "nope.svs").endswith("nope.svs: no such file")
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    assert "file is empty" in _error(empty)
    assert "is a directory" in _error(tmp_path)


def test_every_backend_refusing_lists_each_reason(slide, spy_readers):
    message = _error(slide.path, readers=("refuses", "refuses"))
    assert message.count("test reader refuses everything") == 2


def test_unknown_reader_is_a_config_error(slide):
    with pytest.raises(ConfigError, match="unknown slide reader 'pillow'"):
        open_slide(slide.path, readers=("pillow",))
    with pytest.raises(ConfigError, match="empty"):
        open_slide(slide.path, readers=())
