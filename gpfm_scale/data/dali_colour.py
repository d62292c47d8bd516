"""torchvision's ColorJitter and grayscale, pixel for pixel, written in DALI arithmetic (CPU or GPU graphs).

Why not DALI's own operators: `fn.color_twist` / `fn.hsv` / `fn.hue` / `fn.saturation` are one linear map in YIQ
space (hue is a rotation about the grey axis, not a shift in HSV), `fn.brightness_contrast` pivots on a constant
grey rather than on the mean of the image's greyscale, and all of them apply the four adjustments in one fixed
order and round where torchvision truncates. The torch path (`augmentations.py`) calls torchvision's kernels, so
this module reproduces those kernels (torchvision 0.29 `transforms/v2/functional/_color.py`) step by step:
  brightness b: floor(clamp(x * b, 0, 255));
  contrast c:   floor(clamp(x * c + (1 - c) * m, 0, 255)), m = mean over the image of floor(grey);
  saturation s: floor(clamp(x * s + (1 - s) * floor(grey), 0, 255)) per pixel;
  hue h (turns): x / 255 -> HSV (torchvision's formulas) -> H = (H + h) mod 1 -> RGB -> floor(255.999 * v);
  grayscale:    floor(grey), grey = 0.2989 R + 0.587 G + 0.114 B;
and, like ColorJitter, applies the first four in a random order drawn per sample (one of the 24 permutations).
Images travel as float32 HWC holding integer values 0..255, so the uint8 truncation after each adjustment is
explicit and the image is cast once per jitter, not per adjustment. Each Python arithmetic operation is one DALI
operator, so the graph is written to keep their number down (about 210 per crop; see `color_jitter`). Cost on a
CPU pipeline (DALI 2.4, one thread, 224-px crop): ~21-26 ms per jitter (hue ~10, each of six blends ~2.6) against
~1.2 ms for the single `fn.color_twist` it replaces; the recipe's 10 crops went from ~15 to ~70 ms of CPU per
image. On the GPU these are elementwise kernels over a batch (~2,400 small operators per batch in all).
Difference from the torch path on the same factors and order (tests/unit/data/test_dali_pipeline.py): float32
rounding of the grey weights and of 1 - f only; about 2 pixels in 10,000 differ, by one grey level.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import do_not_convert
except ImportError:  # DALI not installed: nothing here is called (dali_pipeline checks dali_available())
    dmath = fn = types = None  # type: ignore[assignment]

    def do_not_convert(func: Any) -> Any:
        return func

# Index -> order of the adjustments (0 brightness, 1 contrast, 2 saturation, 3 hue), position by position.
PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))
_HUE = 3
_GREY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # torchvision's greyscale weights (not 0.299)
_TO_UINT8 = 255.0 + 1.0 - 1e-3  # torchvision's float -> uint8 scale before truncation (to_dtype, scale=True)
# torchvision's hsv -> rgb gather table: per sector 0..5, which of (v, p, q, t) each output channel (R, G, B) takes.
_SECTOR_SOURCES = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def _slot_kinds(before_hue: bool) -> list[list[int]]:
    """Per blend slot 0..2, per order index: the adjustment (0..2) that slot runs, or 3 for none (identity).

    The order is split around hue: the blend adjustments (brightness, contrast, saturation) that precede hue run
    in the slots before it, the others in the slots after it, each keeping its rank among the three.
    """
    table = []
    for slot in range(3):
        row = []
        for perm in PERMUTATIONS:
            blends, hue_at = [op for op in perm if op != _HUE], perm.index(_HUE)
            row.append(blends[slot] if (slot < hue_at) == before_hue else _HUE)
        table.append(row)
    return table


@do_not_convert
def to_float(image: Any) -> Any:
    """uint8 HWC image -> float32 HWC (the working form: integer values 0..255)."""
    return fn.cast(image, dtype=types.FLOAT)


@do_not_convert
def to_uint8(image: Any) -> Any:
    """float32 HWC of integer values 0..255 -> uint8 HWC (exact)."""
    return fn.cast(image, dtype=types.UINT8)


def _grey(image: Any) -> Any:
    """floor(0.2989 R + 0.587 G + 0.114 B): torchvision's greyscale of a uint8 image, float32 [H, W, 1]."""
    return dmath.floor(fn.reductions.sum(image * types.Constant(_GREY_WEIGHTS), axes=[2], keep_dims=True))


@do_not_convert
def grayscale(image: Any) -> Any:
    """torchvision `rgb_to_grayscale(x, num_output_channels=3)` of a uint8 image (float32 HWC in and out)."""
    grey = _grey(image)
    return fn.cat(grey, grey, grey, axis=2)


def _blend(image: Any, factors: Any, kind: Any) -> Any:
    """One of brightness / contrast / saturation / none, chosen per sample by `kind` (0..3; int32 DataNode):
    floor(clamp(x * f + (1 - f) * pivot, 0, 255)) with f = factors[kind] (factors[3] = 1) and pivot 0, the mean
    of the greyscale image, or the greyscale pixel. The unselected pivots get weight 0, so the result is exact."""
    factor = factors[kind]
    grey = _grey(image)
    pivot = grey * (kind == 2) + fn.reductions.mean(grey) * (kind == 1)
    return dmath.floor(dmath.clamp(image * factor + pivot * (1.0 - factor), 0.0, 255.0))


def _frac(value: Any) -> Any:
    """value mod 1 for float values (torch's fmod/remainder by 1.0 on the values met here)."""
    return value - dmath.floor(value)


def hue(image: Any, shift: Any) -> Any:
    """Shift the HSV hue by `shift` turns ([-0.5, 0.5]): torchvision `_rgb_to_hsv` / `_hsv_to_rgb` with the same
    float operations; branches on which channel is the maximum, and the sector gather, become products with 0/1
    masks (exact: one term is non-zero). float32 HWC in and out."""
    rgb = image * (1.0 / 255.0)
    maxc = fn.reductions.max(rgb, axes=[2], keep_dims=True)
    minc = fn.reductions.min(rgb, axes=[2], keep_dims=True)
    flat = maxc == minc  # grey pixel: hue and saturation 0; the divisors become 1 as in torchvision
    span = maxc - minc
    sat = span / (maxc + flat * (1.0 - maxc))
    dist = (maxc - rgb) / (span + flat)
    rc, gc, bc = dist[:, :, 0:1], dist[:, :, 1:2], dist[:, :, 2:3]
    r, g = rgb[:, :, 0:1], rgb[:, :, 1:2]
    not_r = maxc != r
    is_g = maxc == g
    h = (bc - gc) * (maxc == r) + (rc + 2.0 - bc) * (is_g & not_r) + (gc + 4.0 - rc) * (not_r & (maxc != g))
    h6 = _frac(_frac(h * (1.0 / 6.0) + 1.0) + shift) * 6.0
    sector = dmath.floor(h6)
    f = h6 - sector
    sector = sector - 6.0 * (sector >= 6.0)  # h == 1.0 after rounding: sector 6 is sector 0
    sxf = sat * f
    vpqt = (maxc, dmath.clamp((1.0 - sat) * maxc, 0.0, 1.0), dmath.clamp((1.0 - sxf) * maxc, 0.0, 1.0),
            dmath.clamp((sxf + (1.0 - sat)) * maxc, 0.0, 1.0))
    out = None
    for k, sources in enumerate(_SECTOR_SOURCES):
        term = fn.cat(*(vpqt[i] for i in sources), axis=2) * (sector == k)
        out = term if out is None else out + term
    return dmath.floor(out * _TO_UINT8)


@do_not_convert
def color_jitter(image: Any, factors: tuple[Any, Any, Any, Any], order: Any) -> Any:
    """torchvision ColorJitter on a float32 HWC image with the given factors (brightness, contrast, saturation:
    per-sample float32 DataNodes; hue shift in turns: DataNode or constant) applied in the order
    `PERMUTATIONS[order]` (order: int32 DataNode, 0..23).

    No conditionals: the blend adjustments before hue run in three slots, hue once, the rest in three more slots;
    each slot picks its adjustment per sample (or none). Every sample pays for six blends and one hue.
    """
    b, c, s, h = factors
    blend_factors = fn.stack(b, c, s, b * 0.0 + 1.0)  # [4] per sample; index 3 = no adjustment
    keys = list(range(len(PERMUTATIONS)))
    for before_hue in (True, False):
        for row in _slot_kinds(before_hue):
            image = _blend(image, blend_factors, fn.lookup_table(order, keys=keys, values=row, dtype=types.INT32))
        if before_hue:
            image = hue(image, h)
    return image
