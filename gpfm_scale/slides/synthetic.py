"""Synthetic Aperio-style slides with known geometry and known tissue classes, for tests, benchmarks and the demo.

Why synthetic: the only real slide we may ship is small and single-level; the tiling stage needs pyramids of any
size, slides without MPP, and tissue whose class is known per pixel so that downstream evaluation has a signal.

Layout of the file (Aperio SVS as written by scanners, so cuCIM, OpenSlide and tiffslide all see the same levels):
page 0 level 0 (tiled JPEG, ImageDescription `Aperio Image Library ...|AppMag = ..|MPP = ..`), page 1 a stripped
thumbnail, pages 2.. the reduced levels (tiled JPEG, each `DOWNSAMPLE` times smaller than the one before), then
a label (subfiletype 1) and a macro image (subfiletype 9). Resolution tags (pixels per cm) are written too, because
cuCIM's `spacing()` reads only those. Each level is downsampled 4x from the one before, as Aperio scanners do.

Content: a white background with tissue blobs (a smooth random field, thresholded, cut into connected components).
Each blob gets one class; each class has its own texture (class 0: dense purple nuclei; class 1: pink fibrous
stripes; further classes vary density, stripe angle and hue). Everything is built at low resolution once and then
rendered tile by tile with cheap per-tile operations, so a 4096 x 4096 slide writes in about a second.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import tifffile

from gpfm_scale.slides._synthetic_content import SlideContent, build_content

logger = logging.getLogger(__name__)

DOWNSAMPLE = 4
"""Downsample factor between consecutive pyramid levels (Aperio's choice)."""
APERIO_HEADER = "Aperio Image Library v12.0.15"


@dataclass(frozen=True, eq=False)
class SyntheticSlideInfo:
    """What a synthetic slide holds, so tests know the truth without reading it back.

    level_dimensions: (width, height) per level in px; mask: uint8 [H_m, W_m] class map at `mask_scale` level-0 px
    per mask px (0 = background, i + 1 = classes[i]); mpp: µm per level-0 px used to draw (None in the file when
    `mpp_in_metadata` is False).
    """

    path: str
    width: int
    height: int
    mpp: float
    mpp_in_metadata: bool
    tile: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    classes: tuple[str, ...]
    mask: np.ndarray = field(repr=False)
    mask_scale: int
    content: SlideContent = field(repr=False)

    def label_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Class index per level-0 pixel of the region, uint8 [height, width]: 0 background, i + 1 = classes[i].

        Computed by the same code that drew the pixels, so it is exact, not an approximation.
        """
        return self.content.label_region(x, y, width, height)

    def class_mask(self, name: str) -> np.ndarray:
        """bool [H_m, W_m] on the mask grid (`mask_scale` level-0 px per cell): where class `name` was drawn."""
        return self.mask == self.classes.index(name) + 1

    def label_at(self, x: int, y: int) -> str | None:
        """The class name at level-0 pixel (x, y), or None on background (or when the slide has no classes)."""
        value = int(self.label_region(x, y, 1, 1)[0, 0])
        return self.classes[value - 1] if value and self.classes else None

    def majority_label(self, x: int, y: int, size: int) -> tuple[str | None, float]:
        """(most common class among tissue pixels, tissue fraction) of a square level-0 region."""
        labels = self.label_region(x, y, size, size)
        counts = np.bincount(labels.ravel(), minlength=len(self.classes) + 1)
        tissue = counts[1:].sum()
        if tissue == 0 or not self.classes:
            return None, float(tissue) / labels.size
        return self.classes[int(np.argmax(counts[1:]))], float(tissue) / labels.size


def write_synthetic_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    mpp: float = 0.25,
    tile: int = 256,
    levels: int = 3,
    seed: int = 0,
    classes: Sequence[str] | None = ("a", "b"),
    quality: int = 90,
    mpp_in_metadata: bool = True,
) -> SyntheticSlideInfo:
    """Write a pyramidal, tiled, JPEG-compressed Aperio-style SVS and return what it holds.

    width/height: level-0 size in px; mpp: µm per level-0 px; tile: stored tile size (multiple of 16 and of 4);
    levels: number of pyramid levels (fewer when the next one would be smaller than 16 px); classes: tissue class
    names (None: one generic H&E texture); mpp_in_metadata False writes no MPP, no AppMag and no resolution tags.
    """
    if tile % 16 or tile % DOWNSAMPLE:
        raise ValueError(f"tile must be a multiple of 16 and of {DOWNSAMPLE}, got {tile}")
    if width < 1 or height < 1 or levels < 1 or mpp <= 0:
        raise ValueError(f"invalid slide geometry {width}x{height}, levels={levels}, mpp={mpp}")
    names = tuple(classes) if classes else ()
    content = build_content(width, height, mpp, seed, max(len(names), 1), generic=not names)
    dims = _level_dims(width, height, levels)
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
        reduced = _write_level0(tif, content, tile, quality, mpp if mpp_in_metadata else None)
        pyramid = _reduce_pyramid(reduced, dims)
        _write_thumbnail(tif, pyramid[-1], width, height)
        for level in range(1, len(dims)):
            _write_reduced(tif, pyramid[level - 1], dims, level, tile, quality, mpp if mpp_in_metadata else None)
        _write_associated(tif, pyramid[-1], seed)
    downsamples = tuple(float(DOWNSAMPLE**k) for k in range(len(dims)))
    logger.debug("wrote synthetic slide %s: %dx%d, %d levels", path, width, height, len(dims))
    return SyntheticSlideInfo(
        path=str(path),
        width=width,
        height=height,
        mpp=mpp,
        mpp_in_metadata=mpp_in_metadata,
        tile=tile,
        level_dimensions=tuple(dims),
        level_downsamples=downsamples,
        classes=names,
        mask=content.mask_labels(),
        mask_scale=content.scale,
        content=content,
    )


def _level_dims(width: int, height: int, levels: int) -> list[tuple[int, int]]:
    dims = [(width, height)]
    for _ in range(1, levels):
        w, h = dims[-1][0] // DOWNSAMPLE, dims[-1][1] // DOWNSAMPLE
        if min(w, h) < 16:
            break
        dims.append((w, h))
    return dims


def _description(width: int, height: int, tile: int, quality: int, mpp: float | None, extra: str = "") -> str:
    text = f"{APERIO_HEADER} \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}){extra} JPEG/RGB Q={quality}"
    if mpp is not None:
        text += f"|AppMag = {10.0 / mpp:g}|MPP = {mpp:.4f}"
    return text


def _resolution(mpp: float | None, downsample: float) -> tuple[tuple[float, float] | None, str]:
    """TIFF (resolution, unit): pixels per centimetre (1 cm = 1e4 µm), or none at all when the MPP is withheld."""
    if mpp is None:
        return None, "NONE"
    ppcm = 1e4 / (mpp * downsample)
    return (ppcm, ppcm), "CENTIMETER"


def _write_level0(
    tif: tifffile.TiffWriter, content: SlideContent, tile: int, quality: int, mpp: float | None
) -> np.ndarray:
    """Write level 0 tile by tile; return it downsampled by DOWNSAMPLE (padded to whole tiles) for the pyramid."""
    cols, rows = -(-content.width // tile), -(-content.height // tile)
    small = tile // DOWNSAMPLE
    reduced = np.empty((rows * small, cols * small, 3), np.uint8)
    resolution, unit = _resolution(mpp, 1.0)

    def tiles() -> Iterator[np.ndarray]:
        for r in range(rows):
            for c in range(cols):
                pixels = content.render(c * tile, r * tile, tile, tile)
                reduced[r * small : (r + 1) * small, c * small : (c + 1) * small] = cv2.resize(
                    pixels, (small, small), interpolation=cv2.INTER_AREA
                )
                yield pixels

    tif.write(
        tiles(),
        shape=(content.height, content.width, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality},
        description=_description(content.width, content.height, tile, quality, mpp),
        metadata=None,
        software=False,
        resolution=resolution,
        resolutionunit=unit,
    )
    return reduced


def _reduce_pyramid(reduced: np.ndarray, dims: list[tuple[int, int]]) -> list[np.ndarray]:
    """Levels 1.. as RGB arrays cropped to their size (for a one-level slide: level 0 / 4, for the thumbnail)."""
    w0, h0 = dims[0]
    pyramid = [np.ascontiguousarray(reduced[: max(1, h0 // DOWNSAMPLE), : max(1, w0 // DOWNSAMPLE)])]
    for w, h in dims[2:]:
        prev = pyramid[-1]
        pad_h, pad_w = h * DOWNSAMPLE, w * DOWNSAMPLE
        pyramid.append(cv2.resize(prev[:pad_h, :pad_w], (w, h), interpolation=cv2.INTER_AREA))
    return pyramid


def _write_thumbnail(tif: tifffile.TiffWriter, smallest: np.ndarray, width: int, height: int) -> None:
    scale = min(1.0, 768 / max(smallest.shape[:2]))
    size = (max(1, round(smallest.shape[1] * scale)), max(1, round(smallest.shape[0] * scale)))
    thumb = cv2.resize(smallest, size, interpolation=cv2.INTER_AREA)
    desc = f"{APERIO_HEADER} \r\n{width}x{height} -> {size[0]}x{size[1]} - "
    tif.write(thumb, photometric="rgb", compression="jpeg", description=desc, metadata=None, software=False)


def _write_reduced(
    tif: tifffile.TiffWriter,
    pixels: np.ndarray,
    dims: list[tuple[int, int]],
    level: int,
    tile: int,
    quality: int,
    mpp: float | None,
) -> None:
    w0, h0 = dims[0]
    w, h = dims[level]
    desc = _description(w0, h0, tile, quality, mpp, extra=f" -> {w}x{h}")
    resolution, unit = _resolution(mpp, float(DOWNSAMPLE**level))
    pad = ((0, -h % tile), (0, -w % tile), (0, 0))
    padded = np.pad(pixels, pad, constant_values=255)  # edge tiles padded white, like level 0
    tiles = (padded[r : r + tile, c : c + tile] for r in range(0, h, tile) for c in range(0, w, tile))
    tif.write(
        tiles,
        shape=(h, w, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality},
        description=desc,
        metadata=None,
        software=False,
        resolution=resolution,
        resolutionunit=unit,
    )


def _write_associated(tif: tifffile.TiffWriter, smallest: np.ndarray, seed: int) -> None:
    """A label (white card with a dark barcode-like block) and a macro (the slide on grey glass), as Aperio has."""
    rng = np.random.default_rng(seed)
    label = np.full((128, 128, 3), 250, np.uint8)
    bars = rng.integers(0, 2, size=24).astype(bool)
    for i, dark in enumerate(bars):
        if dark:
            label[16:112, 16 + 4 * i : 18 + 4 * i] = 20
    tif.write(
        label,
        photometric="rgb",
        compression="lzw",
        subfiletype=1,
        description=f"{APERIO_HEADER} \r\nlabel 128x128",
        metadata=None,
        software=False,
    )
    h, w = smallest.shape[:2]
    scale = 192 / max(h, w)
    body = cv2.resize(smallest, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    macro = np.full((body.shape[0] + 32, body.shape[1] + 96, 3), 200, np.uint8)
    macro[16 : 16 + body.shape[0], 80 : 80 + body.shape[1]] = body
    tif.write(
        macro,
        photometric="rgb",
        compression="jpeg",
        subfiletype=9,
        description=f"{APERIO_HEADER} \r\nmacro {macro.shape[1]}x{macro.shape[0]}",
        metadata=None,
        software=False,
    )


def write_corrupt_slide(path: str | os.PathLike[str], num_bytes: int = 4096, seed: int = 0) -> str:
    """Random bytes under a slide's name (use a .svs suffix): every reader must refuse it with SlideReadError."""
    data = np.random.default_rng(seed).integers(0, 256, size=num_bytes, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def truncate_file(path: str | os.PathLike[str], keep_fraction: float) -> int:
    """Cut a file to `keep_fraction` of its bytes (a half-copied upload); returns the new size in bytes."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    size = int(os.path.getsize(path) * keep_fraction)
    os.truncate(path, size)
    return size
