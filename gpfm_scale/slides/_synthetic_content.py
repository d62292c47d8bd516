"""Pixel content of synthetic slides: tissue blobs with one class each, rendered tile by tile.

Built once at low resolution (a "mask grid" of `scale` level-0 px per cell): a smooth blob field (tissue where it is
positive) and the index of the blob that dominates each cell (its class). A region is rendered by bilinear
interpolation of the field and nearest lookup of the owner, then filled from periodic per-class texture images
(level-0 scale, drawn once) plus luminance noise. Everything per tile is a few vectorised numpy operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

PERIOD = 512
"""Texture period in level-0 px: textures are drawn periodic so tiles never show seams."""
NOISE_PERIOD = 389
"""Noise period in level-0 px, coprime with PERIOD so that two tiles of one class never repeat exactly."""
BACKGROUND = (246, 245, 248)


@dataclass(frozen=True)
class _TextureSpec:
    """One class's look: base colour, nuclei (colour, area fraction, elongation) and fibre stripes."""

    base: tuple[int, int, int]
    nucleus: tuple[int, int, int]
    nucleus_fraction: float
    elongation: float
    stripe: tuple[int, int, int] | None = None
    stripe_cycles: tuple[int, int] = (0, 0)


# Class 0: nuclei-dense purple (tumour-like); class 1: pink fibrous stripes with few nuclei (stroma-like);
# class 2: reddish oblique fibres with medium nuclei; further classes are drawn at random from the seed.
_CLASS_SPECS = (
    _TextureSpec(base=(200, 150, 210), nucleus=(70, 30, 115), nucleus_fraction=0.45, elongation=1.1),
    _TextureSpec(
        base=(242, 190, 212),
        nucleus=(120, 60, 150),
        nucleus_fraction=0.03,
        elongation=2.5,
        stripe=(214, 100, 158),
        stripe_cycles=(6, 21),
    ),
    _TextureSpec(
        base=(236, 160, 170),
        nucleus=(95, 45, 125),
        nucleus_fraction=0.15,
        elongation=1.6,
        stripe=(200, 80, 110),
        stripe_cycles=(15, 15),
    ),
)
_GENERIC = _TextureSpec(base=(232, 168, 200), nucleus=(85, 40, 130), nucleus_fraction=0.15, elongation=1.3)


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in values)
    return r, g, b


def _class_spec(index: int, rng: np.random.Generator) -> _TextureSpec:
    if index < len(_CLASS_SPECS):
        return _CLASS_SPECS[index]
    base = rng.integers((190, 130, 170), (245, 200, 225))
    return _TextureSpec(
        base=_rgb(base),
        nucleus=_rgb(rng.integers((50, 20, 90), (120, 70, 150))),
        nucleus_fraction=float(rng.uniform(0.02, 0.4)),
        elongation=float(rng.uniform(1.0, 2.5)),
        stripe=_rgb(base - rng.integers(30, 70, size=3)),
        stripe_cycles=(int(rng.integers(-20, 21)), int(rng.integers(8, 21))),
    )


def _draw_texture(spec: _TextureSpec, px_per_um: float, rng: np.random.Generator) -> np.ndarray:
    """A PERIOD-periodic RGB texture, uint8 [2*PERIOD, 2*PERIOD, 3] (tiled twice so crops are plain slices)."""
    img = np.empty((PERIOD, PERIOD, 3), np.float32)
    img[:] = spec.base
    if spec.stripe is not None:
        yy, xx = np.mgrid[0:PERIOD, 0:PERIOD].astype(np.float32) * (2 * math.pi / PERIOD)
        kx, ky = spec.stripe_cycles
        wave = np.sin(kx * xx + ky * yy + 1.5 * np.sin(3 * xx + 2 * yy))
        weight = ((wave + 1) / 2) ** 2
        img += weight[..., None] * (np.array(spec.stripe, np.float32) - np.array(spec.base, np.float32))
    radius = max(2.0, 3.5 * px_per_um)
    count = int(spec.nucleus_fraction * PERIOD * PERIOD / (math.pi * radius * radius))
    out = np.ascontiguousarray(img.astype(np.uint8))
    for _ in range(count):
        cx, cy = rng.uniform(0, PERIOD, size=2)
        r = radius * rng.uniform(0.7, 1.2)
        axes = (max(1, int(r * spec.elongation / 1.4)), max(1, int(r / spec.elongation * 1.4)))
        angle = float(rng.uniform(0, 180))
        shade = np.clip(np.array(spec.nucleus) + rng.integers(-20, 21, size=3), 0, 255)
        colour = tuple(int(v) for v in shade)
        for dx in (-PERIOD, 0, PERIOD):
            for dy in (-PERIOD, 0, PERIOD):
                cv2.ellipse(out, (int(cx + dx), int(cy + dy)), axes, angle, 0, 360, colour, -1)
    return np.tile(out, (2, 2, 1))


def _blob_field(mask_w: int, mask_h: int, blob_cells: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sum of anisotropic Gaussian blobs minus a threshold (tissue where > 0), and the dominant blob per cell."""
    num_blobs = max(4, round(0.3 * mask_w * mask_h / (math.pi * blob_cells**2)))
    field = np.full((mask_h, mask_w), -0.5, np.float32)
    best = np.zeros((mask_h, mask_w), np.float32)
    owner = np.zeros((mask_h, mask_w), np.int32)
    for i in range(num_blobs):
        cx, cy = rng.uniform(0, mask_w), rng.uniform(0, mask_h)
        ax, ay = blob_cells * rng.uniform(0.6, 1.4, size=2)
        x0, x1 = max(0, int(cx - 3.5 * ax)), min(mask_w, int(cx + 3.5 * ax) + 1)
        y0, y1 = max(0, int(cy - 3.5 * ay)), min(mask_h, int(cy + 3.5 * ay) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        g = np.exp(-0.5 * (((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2))
        field[y0:y1, x0:x1] += g
        win = best[y0:y1, x0:x1]
        take = g > win
        win[take] = g[take]
        owner[y0:y1, x0:x1][take] = i
    rough = cv2.GaussianBlur(rng.standard_normal((mask_h, mask_w)).astype(np.float32), (0, 0), max(1.0, blob_cells / 6))
    field += 0.6 * rough / max(float(rough.std()), 1e-6) * 0.25
    return field, owner


class SlideContent:
    """Deterministic content of one synthetic slide; `render` and `label_region` agree pixel for pixel."""

    def __init__(self, width: int, height: int, mpp: float, seed: int, num_classes: int, generic: bool) -> None:
        rng = np.random.default_rng(seed)
        self.width, self.height = width, height
        self.scale = max(8, math.ceil(max(width, height) / 1024))
        mask_w, mask_h = -(-width // self.scale) + 1, -(-height // self.scale) + 1
        blob_px = min(max(min(width, height) / 10, 48.0), 1500.0)
        self.field, owner = _blob_field(mask_w, mask_h, blob_px / self.scale, rng)
        blob_class = rng.permutation(int(owner.max()) + 1) % num_classes
        self.owner_class = (blob_class[owner] + 1).astype(np.uint8)
        specs = [_GENERIC] if generic else [_class_spec(k, rng) for k in range(num_classes)]
        background = np.empty((2 * PERIOD, 2 * PERIOD, 3), np.uint8)
        background[:] = BACKGROUND
        self.textures = [background] + [_draw_texture(s, 1.0 / mpp, rng) for s in specs]
        noise = np.clip(rng.normal(0, 6, size=(NOISE_PERIOD, NOISE_PERIOD)), -20, 20).astype(np.int16)
        self.noise = np.tile(noise, (2, 2))

    def _axis(self, pos_px: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bilinear source cells (i0, i1) and weight t on the mask grid for level-0 px positions along one axis."""
        pos = np.clip((pos_px.astype(np.float32) + 0.5) / self.scale - 0.5, 0, limit - 1)
        i0 = np.minimum(pos.astype(np.int64), limit - 2)
        return i0, i0 + 1, (pos - i0).astype(np.float32)

    def labels_at(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Class index at every (row, col) pair of level-0 px, uint8 [len(rows), len(cols)]; 0 background/outside."""
        mh, mw = self.field.shape
        x0, x1, tx = self._axis(cols, mw)
        y0, y1, ty = self._axis(rows, mh)
        f = self.field
        top = f[y0][:, x0] * (1 - tx) + f[y0][:, x1] * tx
        bottom = f[y1][:, x0] * (1 - tx) + f[y1][:, x1] * tx
        value = top * (1 - ty)[:, None] + bottom * ty[:, None]
        near_x = np.where(tx < 0.5, x0, x1)
        near_y = np.where(ty < 0.5, y0, y1)
        labels = np.where(value > 0, self.owner_class[near_y][:, near_x], 0).astype(np.uint8)
        labels[(rows < 0) | (rows >= self.height)] = 0
        labels[:, (cols < 0) | (cols >= self.width)] = 0
        return labels

    def label_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Class index per level-0 px, uint8 [height, width]: 0 background (or outside the slide), k + 1 class k."""
        return self.labels_at(x + np.arange(width), y + np.arange(height))

    def render(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3] of the level-0 region at (x, y); pure white outside the slide."""
        labels = self.label_region(x, y, width, height)
        out = self._crop(self.textures[0], x, y, width, height).copy()
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(self.textures)))
        for k in present[present > 0]:
            np.copyto(out, self._crop(self.textures[k], x, y, width, height), where=(labels == k)[..., None])
        noise = self._crop(self.noise, x, y, width, height, NOISE_PERIOD)
        out = np.clip(out.astype(np.int16) + noise[..., None], 0, 255).astype(np.uint8)
        rows, cols = y + np.arange(height), x + np.arange(width)
        out[(rows < 0) | (rows >= self.height)] = 255
        out[:, (cols < 0) | (cols >= self.width)] = 255
        return out

    @staticmethod
    def _crop(tex: np.ndarray, x: int, y: int, width: int, height: int, period: int = PERIOD) -> np.ndarray:
        ox, oy = x % period, y % period
        if width <= period and height <= period:
            return tex[oy : oy + height, ox : ox + width]
        rows = (y + np.arange(height)) % period
        cols = (x + np.arange(width)) % period
        return tex[rows][:, cols]

    def mask_labels(self) -> np.ndarray:
        """Class map on the mask grid, uint8 [H_m, W_m]; cell (i, j) = label of level-0 px (j*s + s/2, i*s + s/2)."""
        mh, mw = self.field.shape
        half = self.scale // 2
        return self.labels_at(np.arange(mw) * self.scale + half, np.arange(mh) * self.scale + half)


def build_content(
    width: int, height: int, mpp: float, seed: int, num_classes: int, generic: bool = False
) -> SlideContent:
    """Content of a `width` x `height` level-0 slide at `mpp` µm/px; `generic`: one H&E texture for all tissue."""
    return SlideContent(width, height, mpp, seed, num_classes, generic)
