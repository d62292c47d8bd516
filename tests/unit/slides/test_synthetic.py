"""Synthetic slides: geometry, determinism, speed, and that class labels match what was drawn."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpfm_scale.slides.synthetic import (
    APERIO_HEADER,
    DOWNSAMPLE,
    truncate_file,
    write_corrupt_slide,
    write_synthetic_slide,
)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "slide.svs"
    return write_synthetic_slide(path, 2048, 1536, mpp=0.25, tile=256, levels=3, seed=3)


def test_geometry_and_pages(slide):
    assert slide.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
    assert slide.level_downsamples == (1.0, 4.0, 16.0)
    with tifffile.TiffFile(slide.path) as tif:
        assert tif.is_svs
        pages = list(tif.pages)
        assert [p.is_tiled for p in pages] == [True, False, True, True, False, False]
        assert [p.subfiletype for p in pages] == [0, 0, 0, 0, 1, 9]
        assert pages[0].description.startswith(APERIO_HEADER)
        assert "|AppMag = 40|MPP = 0.2500" in pages[0].description
        assert (pages[0].tilewidth, pages[0].tilelength) == (256, 256)
        assert pages[0].compression == 7  # JPEG
        assert pages[0].tags["XResolution"].value == (40000, 1)  # px per cm = 1e4 / 0.25


def test_no_mpp_anywhere(tmp_path):
    info = write_synthetic_slide(tmp_path / "n.svs", 512, 512, mpp_in_metadata=False, levels=2)
    with tifffile.TiffFile(info.path) as tif:
        for page in tif.pages:
            assert "MPP" not in page.description and "AppMag" not in page.description
            assert page.tags["ResolutionUnit"].value == 1  # NONE


def test_deterministic_by_seed(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.svs", 640, 512, seed=7, levels=2)
    b = write_synthetic_slide(tmp_path / "b.svs", 640, 512, seed=7, levels=2)
    c = write_synthetic_slide(tmp_path / "c.svs", 640, 512, seed=8, levels=2)
    assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
    assert not np.array_equal(a.mask, c.mask)


def test_both_classes_present_and_drawn_differently(slide):
    level0 = tifffile.TiffFile(slide.path).pages[0].asarray()
    assert set(np.unique(slide.mask)) == {0, 1, 2}
    means: dict[str | None, list[np.ndarray]] = {"a": [], "b": [], None: []}
    for y in range(0, 1536, 128):
        for x in range(0, 2048, 128):
            label, fraction = slide.majority_label(x, y, 128)
            if fraction in (0.0, 1.0):
                means[label].append(level0[y : y + 128, x : x + 128].reshape(-1, 3).mean(0))
    assert all(len(v) >= 3 for v in means.values()), {k: len(v) for k, v in means.items()}
    a, b, bg = (np.mean(means[k], axis=0) for k in ("a", "b", None))
    # class a: dense dark-purple nuclei on lilac -> much darker green than class b's pink stripes
    assert a[1] < b[1] - 30
    assert a[2] > a[1] and b[0] > b[1]  # both H&E-ish (more red/blue than green)
    assert bg.min() > 235  # background is near-white glass


def test_label_at_matches_pixels(slide):
    """Background pixels (label None) are near-white; tissue pixels are not (JPEG noise aside)."""
    level0 = tifffile.TiffFile(slide.path).pages[0].asarray()
    labels = slide.label_region(0, 0, 2048, 1536)
    grey = level0.astype(np.int16).min(axis=2)
    assert np.percentile(grey[labels == 0], 5) > 215
    assert np.percentile(grey[labels > 0], 50) < 200
    ys, xs = np.nonzero(labels)
    assert slide.label_at(int(xs[0]), int(ys[0])) == slide.classes[labels[ys[0], xs[0]] - 1]
    assert slide.label_at(-5, 10) is None and slide.label_at(2048, 0) is None


def test_mask_agrees_with_label_region(slide):
    s = slide.mask_scale
    i, j = 37, 101
    assert slide.mask[i, j] == slide.label_region(j * s + s // 2, i * s + s // 2, 1, 1)[0, 0]
    a, b = slide.class_mask("a"), slide.class_mask("b")
    assert a.any() and b.any() and not (a & b).any()
    assert ((slide.mask > 0) == (a | b)).all()


def test_generic_and_more_classes(tmp_path):
    generic = write_synthetic_slide(tmp_path / "g.svs", 1024, 1024, classes=None, levels=2)
    assert generic.classes == () and set(np.unique(generic.mask)) <= {0, 1}
    assert generic.label_at(*_first_tissue(generic)) is None
    three = write_synthetic_slide(tmp_path / "t.svs", 2048, 2048, classes=("a", "b", "c"), levels=2)
    assert set(np.unique(three.mask)) == {0, 1, 2, 3}


def _first_tissue(info):
    ys, xs = np.nonzero(info.label_region(0, 0, info.width, info.height))
    return int(xs[0]), int(ys[0])


def test_small_slide_drops_tiny_levels(tmp_path):
    info = write_synthetic_slide(tmp_path / "s.svs", 300, 200, levels=4, tile=224)
    assert info.level_dimensions == ((300, 200), (75, 50))
    assert DOWNSAMPLE == 4


def test_fast_enough(tmp_path):
    start = time.perf_counter()
    write_synthetic_slide(tmp_path / "big.svs", 4096, 4096)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"4096x4096 took {elapsed:.1f} s (about 0.5 s expected on one core)"


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="tile"):
        write_synthetic_slide(tmp_path / "x.svs", 512, 512, tile=250)
    with pytest.raises(ValueError, match="geometry"):
        write_synthetic_slide(tmp_path / "x.svs", 512, 512, mpp=0)


def test_corrupt_and_truncate(tmp_path):
    path = write_corrupt_slide(tmp_path / "bad.svs", num_bytes=1000)
    assert os.path.getsize(path) == 1000
    assert Path(path).read_bytes()[:4] not in (b"II*\x00", b"MM\x00*")
    assert truncate_file(path, 0.25) == 250 and os.path.getsize(path) == 250
    with pytest.raises(ValueError):
        truncate_file(path, 1.5)
