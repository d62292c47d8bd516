"""Two-class synthetic H&E-like tiles for CPU training tests ("does training improve kNN over random init?").

Both classes mix the same pink (eosin) background and purple (haematoxylin) material, with colours and the purple
area fraction drawn per tile from the SAME distributions, so colour statistics overlap and a colour-histogram
classifier is far from perfect. They differ in texture/shape only:
  class 0 "nuclei": many small dark discs (radius ~ size/32, a few pixels), scattered: fine, isotropic,
    high-frequency texture;
  class 1 "fibres": wide smooth oriented bands (period ~ size/3), i.e. low-frequency texture.
Pixel noise of the same strength is added to both. A texture feature (e.g. high-frequency energy) separates the
classes; a model must learn shape/texture, not colour, to separate them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_PINK = np.array([232.0, 170.0, 205.0])
_PURPLE = np.array([120.0, 70.0, 160.0])


def _tile_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile stain colours: shared jitter of both classes (staining varies between slides)."""
    shift = rng.normal(0.0, 12.0, size=3)
    return _PINK + shift + rng.normal(0.0, 6.0, 3), _PURPLE + shift + rng.normal(0.0, 10.0, 3)


def _nuclei_density(size: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """[size, size] in [0, 1]: small soft-edged discs covering about `fraction` of the tile."""
    radius = max(1.2, size / 32.0) * rng.uniform(0.8, 1.25)
    n = max(1, round(-math.log(1.0 - fraction) * size * size / (math.pi * radius**2)))
    reach = math.ceil(radius + 1.0)
    offsets = np.arange(-reach, reach + 1)
    density = np.zeros((size, size))
    for cy, cx in rng.uniform(0, size, size=(n, 2)):
        ys = np.clip(int(cy) + offsets, 0, size - 1)
        xs = np.clip(int(cx) + offsets, 0, size - 1)
        dist = np.sqrt((ys[:, None] + 0.5 - cy) ** 2 + (xs[None, :] + 0.5 - cx) ** 2)
        window = np.ix_(ys, xs)
        density[window] = np.maximum(density[window], np.clip(radius + 0.5 - dist, 0.0, 1.0))
    return density


def _fibre_density(size: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """[size, size] in [0, 1]: smooth oriented bands, purple where sin(.) exceeds cos(pi * fraction)."""
    theta = rng.uniform(0.0, math.pi)
    period = size / rng.uniform(2.0, 4.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    wobble = 0.15 * period * np.sin(2 * math.pi * yy / (size * rng.uniform(0.8, 1.5)) + rng.uniform(0, 6.3))
    u = (xx * math.cos(theta) + yy * math.sin(theta) + wobble) * 2 * math.pi / period + rng.uniform(0, 6.3)
    return 1.0 / (1.0 + np.exp(-(np.sin(u) - math.cos(math.pi * fraction)) / 0.12))


def make_tile(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 tile [3, size, size] of class `label` (0 nuclei, 1 fibres)."""
    pink, purple = _tile_colours(rng)
    fraction = rng.uniform(0.15, 0.45)
    density = _nuclei_density(size, fraction, rng) if label == 0 else _fibre_density(size, fraction, rng)
    rgb = pink[:, None, None] * (1.0 - density) + purple[:, None, None] * density
    rgb = rgb + rng.normal(0.0, 8.0, size=rgb.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def make_two_class_tiles(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n tiles uint8 [n, 3, size, size] and labels int64 [n] (alternating 0, 1: balanced), reproducible from seed."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    tiles = np.stack([make_tile(int(lab), size, rng) for lab in labels]) if n else np.zeros((0, 3, size, size))
    return torch.from_numpy(tiles.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))
