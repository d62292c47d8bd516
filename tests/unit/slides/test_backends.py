"""cuCIM, OpenSlide and tiffslide give the same geometry, MPP and pixels, white outside, errors as SlideReadError.

Pixel tolerance between backends: 0. All three decode with libjpeg-turbo's default (islow) IDCT and the same
upsampling (cuCIM's CPU decoder, openslide-bin's bundled libjpeg-turbo via libtiff, imagecodecs' jpeg8 codec), so
the same stored JPEG gives the same bytes; this was measured exact on the real SVS and on synthetic slides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.backends.cucim_reader import CucimReader, cucim_mpp
from gpfm_scale.slides.reader import SLIDE_READERS
from gpfm_scale.slides.synthetic import write_synthetic_slide

BACKENDS = ("cucim", "openslide", "tiffslide")
REAL_SVS = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("backends") / "slide.svs"
    return write_synthetic_slide(path, 1800, 1300, mpp=0.25, tile=256, levels=3, seed=1)


@pytest.fixture(scope="module")
def real_svs():
    if not REAL_SVS.exists():
        pytest.skip(f"real test slide not found at {REAL_SVS} (see ../shared/data/README.md)")
    return str(REAL_SVS)


def open_all(path):
    return {name: SLIDE_READERS.get(name)(path) for name in BACKENDS}


def test_all_backends_registered():
    assert set(BACKENDS) <= set(SLIDE_READERS.names())


def test_synthetic_geometry_and_metadata(synthetic):
    for name, reader in open_all(synthetic.path).items():
        with reader:
            assert reader.name == name
            assert reader.level_dimensions == [(1800, 1300), (450, 325), (112, 81)]
            # downsample as each library computes it: mean of width and height ratios
            assert reader.level_downsamples == pytest.approx([1.0, 4.0, (1800 / 112 + 1300 / 81) / 2], rel=1e-6)
            assert reader.mpp == pytest.approx(0.25)
            assert reader.magnification == pytest.approx(40.0)


def test_real_svs_geometry_and_metadata(real_svs):
    for reader in open_all(real_svs).values():
        with reader:
            assert reader.level_dimensions == [(2220, 2967)]
            assert reader.mpp == pytest.approx(0.499)
            assert reader.magnification == pytest.approx(20.0)


def test_no_mpp_slide_reports_none(tmp_path):
    info = write_synthetic_slide(tmp_path / "nompp.svs", 600, 500, mpp_in_metadata=False, levels=2)
    for reader in open_all(info.path).values():
        with reader:
            assert reader.mpp is None, reader.name  # cuCIM's spacing() says [1, 1] here: must not leak through
            assert reader.magnification is None


@pytest.mark.parametrize(
    "level,location,size",
    [
        (0, (300, 200), (256, 256)),
        (0, (1700, 1250), (200, 120)),  # crosses the right and bottom edges
        (1, (400, 800), (128, 96)),
        (2, (0, 0), (112, 81)),
    ],
)
def test_same_pixels_on_synthetic(synthetic, level, location, size):
    regions = {name: r.read_region(location, level, size) for name, r in open_all(synthetic.path).items()}
    for name, region in regions.items():
        assert region.shape == (size[1], size[0], 3) and region.dtype == np.uint8, name
        np.testing.assert_array_equal(region, regions["openslide"], err_msg=name)


def test_same_pixels_on_real_svs(real_svs):
    regions = {name: r.read_region((1000, 1500), 0, (300, 240)) for name, r in open_all(real_svs).items()}
    assert regions["openslide"].std() > 10  # real tissue, not a blank area
    for name, region in regions.items():
        np.testing.assert_array_equal(region, regions["openslide"], err_msg=name)


@pytest.mark.parametrize("name", BACKENDS)
def test_outside_is_white(synthetic, name):
    with SLIDE_READERS.get(name)(synthetic.path) as reader:
        beyond = reader.read_region((1780, 1290), 0, (64, 32))
        assert (beyond[10:, :] == 255).all() and (beyond[:, 20:] == 255).all()
        assert not (beyond[:10, :20] == 255).all()  # the inside corner is slide, not white padding
        before = reader.read_region((-64, -16), 1, (40, 20))
        assert (before[:4] == 255).all() and (before[:, :16] == 255).all()
        assert (reader.read_region((10_000, 10_000), 2, (16, 16)) == 255).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_batch_reads_equal_single_reads(synthetic, name):
    locations = [(0, 0), (256, 512), (1024, 768), (1700, 1200), (512, 256)]
    with SLIDE_READERS.get(name)(synthetic.path) as reader:
        batch = list(reader.read_regions(locations, 0, (224, 224), batch_size=2))
        singles = [reader.read_region(loc, 0, (224, 224)) for loc in locations]
        assert len(batch) == len(locations)
        for got, want in zip(batch, singles):
            np.testing.assert_array_equal(got, want)
        batch[0][:] = 0  # owned copies: writing one must not touch another or crash
        assert batch[1].any()


@pytest.mark.parametrize("name", BACKENDS)
def test_read_level_is_whole_level(synthetic, name):
    with SLIDE_READERS.get(name)(synthetic.path) as reader:
        level = reader.read_level(2)
        assert level.shape == (81, 112, 3)
        np.testing.assert_array_equal(level[:40, :50], reader.read_region((0, 0), 2, (50, 40)))


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_requests_raise_slide_read_error(synthetic, name):
    with SLIDE_READERS.get(name)(synthetic.path) as reader:
        with pytest.raises(SlideReadError, match="level 3 out of range"):
            reader.read_region((0, 0), 3, (10, 10))
        with pytest.raises(SlideReadError, match="positive"):
            reader.read_region((0, 0), 0, (0, 10))


@pytest.mark.parametrize("name", BACKENDS)
def test_open_errors_are_one_line(tmp_path, name):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n" * 20)
    with pytest.raises(SlideReadError) as err:
        SLIDE_READERS.get(name)(str(text))
    message = str(err.value)
    assert message.startswith(f"{name}: cannot open ") and "\n" not in message


def _gpu_present() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, no runtime, or no cupy all mean "no GPU"
        return False


@pytest.mark.skipif(_gpu_present(), reason="checks the no-GPU failure; a GPU is present")
def test_cucim_cuda_without_gpu_fails_at_open(synthetic):
    with pytest.raises(SlideReadError, match="cucim: device 'cuda' unavailable"):
        CucimReader(synthetic.path, device="cuda")


def test_cucim_rejects_unknown_device(synthetic):
    with pytest.raises(SlideReadError, match="device must be"):
        CucimReader(synthetic.path, device="tpu")


@pytest.mark.gpu
def test_cucim_cuda_matches_cpu(synthetic):
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's, so allow small per-pixel differences."""
    with CucimReader(synthetic.path, device="cuda") as gpu, CucimReader(synthetic.path) as cpu:
        a = gpu.read_region((256, 256), 0, (512, 512)).astype(np.int16)
        b = cpu.read_region((256, 256), 0, (512, 512)).astype(np.int16)
        assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 16
        batch = list(gpu.read_regions([(0, 0), (512, 512)], 0, (256, 256), batch_size=2))
        assert np.abs(batch[1].astype(np.int16) - cpu.read_region((512, 512), 0, (256, 256))).mean() < 1.0


@pytest.mark.parametrize(
    "metadata,expected",
    [
        ({"aperio": {"MPP": "0.4990"}, "tiff": {"resolution_unit": "", "x_resolution": 1.0}}, 0.499),
        ({"aperio": {"MPP": "0.25"}, "tiff": {"resolution_unit": "centimeter", "x_resolution": 20000.0}}, 0.25),
        ({"tiff": {"resolution_unit": "centimeter", "x_resolution": 40000.0}}, 0.25),
        ({"tiff": {"resolution_unit": "inch", "x_resolution": 50800.0}}, 0.5),  # 25,400 µm per inch
        ({"tiff": {"resolution_unit": "centimeter", "x_resolution": 1.0}}, None),  # a default tag, not 1e4 µm/px
        ({"tiff": {"resolution_unit": "", "x_resolution": 1.0}}, None),
        ({"aperio": {"MPP": "nan"}, "tiff": {}}, None),
        ({}, None),
    ],
)
def test_cucim_mpp_sources(metadata, expected):
    got = cucim_mpp(metadata)
    assert got == (pytest.approx(expected) if expected is not None else None)
