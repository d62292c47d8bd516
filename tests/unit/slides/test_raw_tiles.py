"""Zero-decode: stored JPEG tiles copied from the TIFF decode to exactly what the readers return for that tile.

Measured max difference (every decoder here: PIL, simplejpeg, OpenCV; all libjpeg-turbo with the default islow
IDCT and fancy upsampling, like the readers): 0 on the real Aperio SVS (RGB + JPEGTables, spliced with an Adobe
APP14 marker) and 0 on synthetic slides (tifffile's complete YCbCr 4:2:0 streams). So the assertions are exact.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
import tifffile
from PIL import Image

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides import backends  # noqa: F401 - registers the readers
from gpfm_scale.slides.raw_tiles import ADOBE_APP14_RGB, standalone_jpeg, tiff_damage
from gpfm_scale.slides.reader import SLIDE_READERS
from gpfm_scale.slides.synthetic import truncate_file, write_synthetic_slide

BACKENDS = ("cucim", "openslide", "tiffslide")
REAL_SVS = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "slide.svs"
    return write_synthetic_slide(path, 1536, 1280, mpp=0.5, tile=256, levels=2, seed=4)


@pytest.fixture(scope="module")
def real_svs():
    if not REAL_SVS.exists():
        pytest.skip(f"real test slide not found at {REAL_SVS} (see ../shared/data/README.md)")
    return str(REAL_SVS)


def decode_all(jpeg: bytes) -> dict[str, np.ndarray]:
    return {
        "pil": np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")),
        "simplejpeg": simplejpeg.decode_jpeg(jpeg, colorspace="RGB"),
        "cv2": cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1],
    }


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_standalone_jpeg_splices_tables_and_marker():
    tables = b"\xff\xd8" + b"\xff\xdb\x00\x04QT" + b"\xff\xd9"
    tile = b"\xff\xd8" + b"\xff\xc0SOF" + b"\xff\xdaSCAN" + b"\xff\xd9"
    rgb = standalone_jpeg(tile, tables, photometric_rgb=True)
    assert rgb == b"\xff\xd8" + ADOBE_APP14_RGB + b"\xff\xdb\x00\x04QT" + b"\xff\xc0SOF\xff\xdaSCAN\xff\xd9"
    assert ADOBE_APP14_RGB[-1] == 0 and ADOBE_APP14_RGB[4:9] == b"Adobe"  # transform 0: no colour conversion
    assert standalone_jpeg(tile, None, photometric_rgb=False) == tile  # a complete stream stays as it is
    with pytest.raises(SlideReadError, match="SOI"):
        standalone_jpeg(b"\x00\x01", tables, photometric_rgb=True)


def test_real_svs_raw_tiles_decode_exactly(real_svs):
    with tifffile.TiffFile(real_svs) as tif:
        page = tif.pages[0]
        assert page.photometric == 2 and page.jpegtables  # RGB components, tables kept apart: the hard case
    readers = {name: SLIDE_READERS.get(name)(real_svs) for name in BACKENDS}
    reference = readers["openslide"]
    for name, reader in readers.items():
        layout = reader.raw_tile_layout(0)
        assert (layout.tile_width, layout.tile_height, layout.compression) == (240, 240, "jpeg"), name
    for col, row in [(0, 0), (4, 6), (8, 11)]:
        raws = {name: r.read_raw_tile(0, col, row) for name, r in readers.items()}
        assert len(set(raws.values())) == 1  # one implementation, whatever the backend
        want = reference.read_region((col * 240, row * 240), 0, (240, 240))
        for decoder, got in decode_all(raws["openslide"]).items():
            assert max_diff(got, want) == 0, (decoder, col, row)


def test_real_svs_edge_tile_is_padded_full_size(real_svs):
    with SLIDE_READERS.get("openslide")(real_svs) as reader:
        got = decode_all(reader.read_raw_tile(0, 9, 12))["pil"]  # 2220 = 9 * 240 + 60; 2967 = 12 * 240 + 87
        assert got.shape == (240, 240, 3)
        assert max_diff(got[:87, :60], reader.read_region((2160, 2880), 0, (60, 87))) == 0


def test_without_adobe_marker_colours_are_wrong(real_svs):
    """The reason for the APP14 marker: without it decoders treat Aperio's RGB components as YCbCr."""
    with tifffile.TiffFile(real_svs) as tif, SLIDE_READERS.get("openslide")(real_svs) as reader:
        page = tif.pages[0]
        tif.filehandle.seek(int(page.dataoffsets[0]))
        stored = tif.filehandle.read(int(page.databytecounts[0]))
        wrong = standalone_jpeg(stored, page.jpegtables, photometric_rgb=False)
        assert max_diff(decode_all(wrong)["pil"], reader.read_region((0, 0), 0, (240, 240))) > 50


def test_synthetic_ycbcr_tiles_are_stored_streams_and_decode_exactly(synthetic):
    with tifffile.TiffFile(synthetic.path) as tif:
        page = tif.pages[0]
        assert page.photometric == 6 and not page.jpegtables  # YCbCr, complete streams
        tif.filehandle.seek(int(page.dataoffsets[7]))
        stored = tif.filehandle.read(int(page.databytecounts[7]))
    readers = {name: SLIDE_READERS.get(name)(synthetic.path) for name in BACKENDS}
    assert readers["cucim"].read_raw_tile(0, 1, 1) == stored  # tile 7 = row 1, col 1 of 6 columns
    for level, tile_px in ((0, 256), (1, 256)):
        cols = -(-synthetic.level_dimensions[level][0] // tile_px)
        for index in (0, cols + 1):
            col, row = index % cols, index // cols
            ds = synthetic.level_downsamples[level]
            for name, reader in readers.items():
                assert reader.raw_tile_layout(level).tile_width == tile_px
                raw = reader.read_raw_tile(level, col, row)
                want = reader.read_region((int(col * tile_px * ds), int(row * tile_px * ds)), level, (tile_px, tile_px))
                level_w, level_h = synthetic.level_dimensions[level]
                inside = (slice(0, level_h - row * tile_px), slice(0, level_w - col * tile_px))
                for decoder, got in decode_all(raw).items():
                    assert got.shape == (tile_px, tile_px, 3)  # edge tiles come padded to full size
                    assert max_diff(got[inside], want[inside]) == 0, (name, decoder, level, col, row)


def test_no_layout_when_not_jpeg_tiled(tmp_path, synthetic):
    lzw = tmp_path / "lzw.tif"
    tifffile.imwrite(lzw, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), compression="lzw", photometric="rgb")
    with SLIDE_READERS.get("tiffslide")(str(lzw)) as reader:
        assert reader.raw_tile_layout(0) is None
        with pytest.raises(SlideReadError, match="no stored JPEG tiles"):
            reader.read_raw_tile(0, 0, 0)
    with SLIDE_READERS.get("openslide")(synthetic.path) as reader:
        assert reader.raw_tile_layout(5) is None
        with pytest.raises(SlideReadError, match="outside level 0"):
            reader.read_raw_tile(0, 6, 0)


def test_raw_tiles_from_threads(synthetic):
    with SLIDE_READERS.get("cucim")(synthetic.path) as reader:
        jobs = [(c, r) for r in range(5) for c in range(6)] * 3
        serial = [reader.read_raw_tile(0, c, r) for c, r in jobs]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda cr: reader.read_raw_tile(0, *cr), jobs))
        assert parallel == serial


def test_tiff_damage(tmp_path, synthetic):
    assert tiff_damage(synthetic.path) is None
    text = tmp_path / "t.svs"
    text.write_text("hello")
    assert tiff_damage(str(text)) is None  # not a TIFF: no opinion, the readers decide
    cut = tmp_path / "cut.svs"
    cut.write_bytes(Path(synthetic.path).read_bytes())
    truncate_file(cut, 0.5)
    assert "page 0 data ends at byte" in tiff_damage(str(cut))
    with tifffile.TiffFile(synthetic.path) as tif:
        last_ifd = tif.pages[-1].offset
    chain = tmp_path / "chain.svs"
    chain.write_bytes(Path(synthetic.path).read_bytes()[:last_ifd])
    assert os.path.getsize(chain) == last_ifd
    assert "directory chain broken" in tiff_damage(str(chain))
