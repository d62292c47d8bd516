"""QC thumbnails: size, what is drawn where, and a PNG that reads back with the right pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from gpfm_scale.slides.config import GridConfig
from gpfm_scale.slides.grid import plan_grid
from gpfm_scale.slides.qc import TILE_RGB, TISSUE_RGB, encode_png, render_thumbnail, save_png


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A 2000 x 1500 thumbnail (downsample 4 of an 8000 x 6000 slide) with a pink disc and its mask."""
    thumb = np.full((1500, 2000, 3), 255, dtype=np.uint8)
    cv2.circle(thumb, (1000, 750), 500, (200, 110, 170), thickness=-1)
    mask = np.zeros((375, 500), dtype=bool)
    cv2.circle(mask.view(np.uint8), (250, 187), 125, 1, thickness=-1)
    return thumb, mask


def _grid(mask: np.ndarray):
    cfg = GridConfig(tile_px=256, min_tissue_fraction=0.5, max_tiles_per_slide=None)
    return plan_grid([(8000, 6000)], [1.0], 0.25, cfg, mask, 16.0, "qc-slide")


def _is(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(img == np.array(rgb, dtype=np.uint8), axis=-1)


def test_render_draws_mask_and_tiles() -> None:
    thumb, mask = _scene()
    before = thumb.copy()
    grid = _grid(mask)
    img = render_thumbnail(thumb, mask, grid, thumb_downsample=4.0, max_width=1024)
    assert img.shape == (768, 1024, 3) and img.dtype == np.uint8
    assert np.array_equal(thumb, before), "input untouched"
    scale = 8000 / 1024  # level-0 px per output px
    x, y = grid.coords[len(grid) // 2]
    top = int(round(y / scale))
    left, right = int(round(x / scale)), int(round((x + 255) / scale))
    assert _is(img[top, left : right + 1], TILE_RGB).mean() > 0.9, "top edge of a kept tile outlined"
    ring = _is(img, TISSUE_RGB)
    yy, xx = np.nonzero(ring)
    radius = np.hypot(xx - 512, yy - 384)
    assert ring.sum() > 100 and np.all(np.abs(radius - 500 / 2000 * 1024) < 6), "outline on the disc edge"
    assert _is(img[:200, :200], TILE_RGB).sum() == 0, "no tiles on background"


def test_render_without_mask_or_grid_and_no_upscale() -> None:
    thumb = np.full((200, 300, 3), 255, dtype=np.uint8)
    img = render_thumbnail(thumb, None, None, thumb_downsample=32.0)
    assert img.shape == (200, 300, 3) and np.all(img == 255)
    img = render_thumbnail(thumb, np.zeros((20, 30), bool), None, thumb_downsample=32.0)
    assert np.all(img == 255)


def test_save_png_reads_back(tmp_path: Path) -> None:
    rgb = np.zeros((30, 50, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red in RGB
    rgb[10:20, 10:20] = (0, 0, 255)  # a blue square
    path = save_png(tmp_path / "qc" / "slide.png", rgb)
    back = np.asarray(Image.open(path).convert("RGB"))
    assert back.shape == (30, 50, 3) and np.array_equal(back, rgb)
    assert encode_png(rgb)[:8] == b"\x89PNG\r\n\x1a\n"
