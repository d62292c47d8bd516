"""Tissue masks on drawn images of known geometry and on real NCT-CRC tiles."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from gpfm_scale.config import build_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.slides.config import TissueConfig
from gpfm_scale.slides.tissue import choose_mask_level, downscale_to_width, mask_from_level, tissue_mask

NCT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "nct-crc-samples"
PINK = (200, 110, 170)
MPP = 2.0  # µm per px of the drawn images: one px is 4 µm²


def _white(h: int, w: int, noise: int = 0, seed: int = 0) -> np.ndarray:
    """White RGB uint8 [h, w, 3], optionally with per-channel noise in [0, noise] subtracted (JPEG-like glass)."""
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    if noise:
        img -= np.random.default_rng(seed).integers(0, noise + 1, size=img.shape, dtype=np.uint8)
    return img


def _disc(img: np.ndarray, centre: tuple[int, int], radius: int, rgb: tuple[int, int, int]) -> None:
    cv2.circle(img, centre, radius, rgb, thickness=-1, lineType=cv2.LINE_8)


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_disc_area_and_speck_removed() -> None:
    img = _white(600, 800, noise=4)
    _disc(img, (300, 300), 150, PINK)
    _disc(img, (700, 100), 6, PINK)  # speck: ~113 px = 450 µm², far below the 65,536 µm² default
    mask = tissue_mask(img, MPP, TissueConfig())
    disc_area = np.pi * 150**2
    assert abs(mask.sum() - disc_area) / disc_area < 0.03
    assert mask[300, 300] and not mask[0, 0]
    assert not mask[95:106, 695:706].any()
    kept = tissue_mask(img, MPP, TissueConfig(min_tissue_area_um2=0))
    assert kept[100, 700], "the speck survives thresholding, so it is the area filter that removes it"


def test_small_hole_filled_large_hole_kept() -> None:
    img = _white(600, 600, noise=3)
    _disc(img, (300, 300), 250, PINK)
    _disc(img, (200, 300), 12, (255, 255, 255))  # ~450 px = 1,800 µm² < 16,384: filled
    _disc(img, (380, 300), 60, (255, 255, 255))  # ~11,300 px = 45,000 µm² > 16,384: stays a hole
    mask = tissue_mask(img, MPP, TissueConfig())
    assert mask[300, 200], "small hole filled"
    assert not mask[300, 380], "large hole kept"
    expected = np.pi * (250**2 - 60**2)
    assert abs(mask.sum() - expected) / expected < 0.03
    unfilled = tissue_mask(img, MPP, TissueConfig(max_hole_area_um2=0))
    assert not unfilled[300, 200]


@pytest.mark.parametrize("value", [255, 240, 128, 0])
def test_blank_images_give_empty_mask(value: int) -> None:
    img = np.full((256, 320, 3), value, dtype=np.uint8)
    mask = tissue_mask(img, MPP, TissueConfig())
    assert mask.shape == (256, 320) and mask.dtype == bool and not mask.any()


def test_saturation_floor_keeps_noisy_glass_empty() -> None:
    img = _white(300, 300, noise=8, seed=1)
    assert not tissue_mask(img, MPP, TissueConfig(median_blur_px=1)).any()
    no_floor = tissue_mask(img, MPP, TissueConfig(median_blur_px=1, min_saturation=0, min_tissue_area_um2=0))
    assert no_floor.mean() > 0.05, "without the floor Otsu calls part of the glass noise tissue"


def test_fixed_threshold() -> None:
    img = _white(200, 200)
    img[:, 100:] = (255, 225, 255)  # saturation 30
    assert tissue_mask(img, MPP, TissueConfig(saturation_threshold=20, min_tissue_area_um2=0))[:, 110:].all()
    assert not tissue_mask(img, MPP, TissueConfig(saturation_threshold=40, min_tissue_area_um2=0)).any()


def test_empty_and_bad_inputs() -> None:
    assert tissue_mask(np.zeros((0, 5, 3), np.uint8), MPP, TissueConfig()).shape == (0, 5)
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((5, 5, 4), np.uint8), MPP, TissueConfig())
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((5, 5, 3), np.uint8), 0.0, TissueConfig())


@pytest.mark.skipif(not NCT.is_dir(), reason=f"real test tiles not found at {NCT}")
def test_real_background_vs_tissue_tiles() -> None:
    back = _read_rgb(next(NCT.glob("BACK-*.tif")))
    tissue = _read_rgb(next(NCT.glob("MUS-*.tif")))
    cfg = TissueConfig(min_tissue_area_um2=1000, max_hole_area_um2=100)
    assert tissue_mask(back, 0.5, cfg).mean() < 0.01
    both = tissue_mask(np.hstack([back, tissue]), 0.5, cfg)
    assert both[:, :224].mean() < 0.05
    assert both[:, 224:].mean() > 0.9


def test_choose_mask_level() -> None:
    assert choose_mask_level([(40000, 30000), (10000, 7500), (2500, 1875), (625, 469)], 2048) == 2
    assert choose_mask_level([(40000, 30000), (10000, 7500), (1900, 1425)], 2048) == 2
    assert choose_mask_level([(2220, 2967)], 2048) == 0
    assert choose_mask_level([(4096, 10), (1024, 10)], 2048) == 0  # equal ratios: the larger level
    with pytest.raises(ValueError):
        choose_mask_level([], 2048)


def test_downscale_and_mask_from_level() -> None:
    level = _white(1500, 2000)
    _disc(level, (1000, 750), 500, PINK)
    assert downscale_to_width(level, 4000) is level
    mask, ds = mask_from_level(level, 4.0, 0.25, TissueConfig(mask_width_px=500))
    assert mask.shape == (375, 500)
    assert ds == pytest.approx(16.0)
    expected = np.pi * (500 / 4) ** 2
    assert abs(mask.sum() - expected) / expected < 0.05


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="median_blur_px"):
        build_config(TissueConfig, {"median_blur_px": 4})
    with pytest.raises(ConfigError, match="saturation_threshold"):
        build_config(TissueConfig, {"saturation_threshold": 300})
    with pytest.raises(ConfigError, match="unknown key"):
        build_config(TissueConfig, {"sthresh": 8})


def test_mask_of_a_synthetic_slide_matches_its_drawn_tissue(tmp_path):
    """Nuclei-dense tissue must come out whole: at full resolution Otsu would split nuclei from stroma instead."""
    from gpfm_scale.slides.synthetic import write_synthetic_slide
    from gpfm_scale.slides.tissue import choose_mask_level, mask_from_level, mask_width

    info = write_synthetic_slide(tmp_path / "s.svs", 3072, 2304, mpp=0.25, levels=3, seed=102, classes=("a",))
    cfg = TissueConfig()
    level = choose_mask_level(info.level_dimensions, mask_width(3072, 0.25, cfg))
    import tifffile

    with tifffile.TiffFile(info.path) as tif:
        pages = [p for p in tif.pages if p.is_tiled]
        rgb = pages[level].asarray()
    mask, ds = mask_from_level(rgb, info.level_downsamples[level], 0.25, cfg)
    truth = info.label_region(0, 0, 3072, 2304)[:: int(round(ds)), :: int(round(ds))] > 0
    truth = truth[: mask.shape[0], : mask.shape[1]]
    agreement = (mask[: truth.shape[0], : truth.shape[1]] == truth).mean()
    assert truth.mean() > 0.2 and agreement > 0.95
