"""DICOM whole-slide images (as IDC serves TCGA) read through wsidicom: geometry, pixels, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.config import GridConfig
from gpfm_scale.slides.grid import plan_grid
from gpfm_scale.slides.open import open_slide
from gpfm_scale.slides.synthetic_dicom import write_dicom_wsi
from gpfm_scale.tiling.regions import grid_regions

pytest.importorskip("wsidicom")


def _image(w: int = 1000, h: int = 700, seed: int = 0) -> np.ndarray:
    """Distinct pixels everywhere (so a shifted or mis-scaled read cannot match), no pure white."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 250, (h, w, 3), dtype=np.uint8)


def _padded(pixels: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """pixels[y:y+size, x:x+size], white where the window leaves the image (what every reader returns)."""
    out = np.full((size, size, 3), 255, np.uint8)
    part = pixels[max(y, 0):y + size, max(x, 0):x + size]
    out[max(-y, 0):max(-y, 0) + part.shape[0], max(-x, 0):max(-x, 0) + part.shape[1]] = part
    return out


def _write_ct(path) -> None:
    """A CT slice as pydicom writes it: a valid DICOM file that is not a slide."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory):
    return write_dicom_wsi(tmp_path_factory.mktemp("dcm") / "slide", _image(), mpp=0.25, tile=256, levels=3)


def test_geometry_and_mpp_from_the_pixel_spacing(dicom_slide):
    with open_slide(dicom_slide.folder) as reader:
        assert reader.name == "dicom"
        assert reader.level_dimensions == [(1000, 700), (500, 350), (250, 175)]
        assert reader.level_downsamples == [1.0, 2.0, 4.0]
        assert reader.mpp == pytest.approx(0.25) and reader.magnification == pytest.approx(40.0)
        assert reader.raw_tile_layout(0) is None


@pytest.mark.parametrize("level", [0, 1, 2])
def test_regions_equal_the_source_pixels_with_white_outside(dicom_slide, level):
    pixels = dicom_slide.levels[level]
    ds = 2**level
    with open_slide(dicom_slide.folder) as reader:
        for x, y in [(0, 0), (37, 11), (200, 100), (pixels.shape[1] - 50, pixels.shape[0] - 30), (-20, -10)]:
            got = reader.read_region((x * ds, y * ds), level, (96, 96))
            np.testing.assert_array_equal(got, _padded(pixels, x, y, 96))


def test_grid_tiles_equal_the_source_pixels(dicom_slide):
    """The tiler's own read path (plan_grid + grid_regions), edge tiles padded white, as on a TIFF slide."""
    source = dicom_slide.levels[0]
    with open_slide(dicom_slide.folder) as reader:
        cfg = GridConfig(tile_px=224, min_tissue_fraction=0.0, max_tiles_per_slide=None)
        grid = plan_grid(reader.level_dimensions, reader.level_downsamples, reader.mpp, cfg,
                         np.ones((70, 100), bool), 10.0, "d")
        assert len(grid) == 5 * 4  # 1000 / 224 -> 5 columns, 700 / 224 -> 4 rows, the last ones padded
        for (x, y), tile in zip(grid.coords.tolist(), grid_regions(reader, grid)):
            np.testing.assert_array_equal(tile, _padded(source, x, y, 224))


def test_one_dcm_file_opens_its_whole_series(dicom_slide):
    with open_slide(dicom_slide.files[1]) as reader:
        assert reader.name == "dicom" and reader.level_dimensions[0] == (1000, 700)


def test_jpeg_frames_decode_close_to_the_source(tmp_path):
    """IDC's TCGA slides are baseline JPEG (YBR_FULL_422); a smooth image survives quality 95 within a few levels."""
    smooth = np.clip(np.add.outer(np.arange(300), np.arange(400))[..., None] // 3 + [0, 40, 80], 0, 240)
    info = write_dicom_wsi(tmp_path / "j", smooth.astype(np.uint8), mpp=0.5, tile=128, levels=2, jpeg=True)
    with open_slide(info.folder) as reader:
        assert reader.mpp == pytest.approx(0.5) and reader.level_dimensions == [(400, 300), (200, 150)]
        got = reader.read_region((0, 0), 0, (400, 300)).astype(int)
    assert np.abs(got - info.levels[0]).mean() < 2


def test_a_dcm_that_is_not_a_slide_says_so(tmp_path):
    _write_ct(tmp_path / "ct.dcm")
    with pytest.raises(SlideReadError, match=r"not a DICOM whole-slide image: SOP class CT Image Storage") as err:
        open_slide(str(tmp_path / "ct.dcm"))
    assert "TIFF" not in str(err.value)
    with pytest.raises(SlideReadError, match="not a DICOM whole-slide image: SOP class CT Image Storage"):
        open_slide(str(tmp_path))  # a folder of non-slide .dcm files
    (tmp_path / "notes.dcm").write_text("not dicom")
    with pytest.raises(SlideReadError, match="notes.dcm is not a readable DICOM file"):
        open_slide(str(tmp_path / "notes.dcm"))


def test_a_folder_of_two_slides_is_refused(tmp_path):
    write_dicom_wsi(tmp_path / "both", _image(300, 200, 1), levels=1)
    other = write_dicom_wsi(tmp_path / "other", _image(300, 200, 2), levels=1)
    (tmp_path / "both" / "level-0.dcm").rename(tmp_path / "both" / "a.dcm")
    (tmp_path / "both" / "b.dcm").write_bytes(open(other.files[0], "rb").read())
    with pytest.raises(SlideReadError, match="holds 2 whole-slide series; give one folder per slide"):
        open_slide(str(tmp_path / "both"))
