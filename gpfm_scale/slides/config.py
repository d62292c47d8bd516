"""Configs of the slide-side geometry: how tissue is found (`TissueConfig`) and how it is cut (`GridConfig`).

Defaults follow GPFM (512-px tiles at level 0, non-overlapping, at most 2,000 per slide, CLAM-style masks: Otsu on
saturation, median blur, closing). Sizes that describe tissue are in µm / µm² so the same config gives the same
result on 20x and 40x slides and whatever resolution the mask happens to be computed at; kernel sizes are in mask
pixels: the mask is computed at `mask_mpp` (4 µm/px) or, on large slides, at most `mask_width_px` wide.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gpfm_scale.config import StrictModel

MPP_AT_1X: float = 10.0
"""µm/px at 1x objective power: the usual convention (40x = 0.25 µm/px, 20x = 0.5 µm/px) to turn mpp into mag."""


class TissueConfig(StrictModel):
    """Tissue segmentation on a low-resolution copy of the slide (CLAM's recipe, in physical units)."""

    mask_width_px: int = Field(
        2048,
        gt=0,
        description="Width in px of the low-resolution image the mask is computed on: the slide level closest to "
        "it is read and downscaled to at most this width.",
    )
    mask_mpp: float = Field(
        4.0,
        gt=0,
        description="Finest resolution of the mask in µm per mask px (the mask is at most mask_width_px wide, so "
        "large slides get coarser). Coarse enough that nuclei blur into their tissue: at full resolution Otsu "
        "separates nuclei from pink stroma instead of tissue from glass.",
    )
    saturation_threshold: int | None = Field(
        None,
        ge=0,
        le=255,
        description="Fixed HSV saturation threshold (0..255); None = Otsu's threshold on the (blurred) saturation.",
    )
    min_saturation: int = Field(
        15,
        ge=0,
        le=255,
        description="Floor on the threshold: saturation at or below it is never tissue. Otsu always splits the "
        "histogram in two, so on a blank slide it would call half the glass (JPEG noise, saturation 0..5) tissue; "
        "glass stays below ~5, faint H&E (mucus) is ~10-20, CLAM's fixed threshold is 20.",
    )
    median_blur_px: int = Field(
        7,
        ge=1,
        description="Median blur kernel (odd, mask px) before thresholding, against noise and dust; 1 = off. CLAM: 7.",
    )
    close_px: int = Field(
        4,
        ge=0,
        description="Morphological closing kernel (mask px) joining nearby tissue fragments; 0 = off. CLAM: 4.",
    )
    min_tissue_area_um2: float = Field(
        65_536.0,
        ge=0,
        description="Connected tissue regions smaller than this (µm²) are removed (dust, debris, pen specks). "
        "Default: one 256 µm x 256 µm square, i.e. one 512-px tile at 20x. CLAM's a_t=100 reference patches is "
        "~1.6 mm² at 40x, which drops small biopsies.",
    )
    max_hole_area_um2: float = Field(
        16_384.0,
        ge=0,
        description="Holes (background enclosed by tissue) smaller than this (µm²) are filled; larger ones (lumens, "
        "tears) stay background. Default: one 128 µm x 128 µm square, a 512-px tile at 40x.",
    )

    @field_validator("median_blur_px")
    @classmethod
    def _odd_blur(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"median_blur_px must be odd (a median kernel has a centre pixel), got {v}")
        return v


class GridConfig(StrictModel):
    """The tile grid: tile size, resolution, stride, tissue filter, per-slide cap and edge policy."""

    tile_px: int = Field(512, gt=0, description="Output tile size in px (square). GPFM: 512.")
    target_mpp: float | None = Field(
        None,
        gt=0,
        description="Output resolution in µm/px; read from the nearest level at least as fine and resized. "
        "None (with target_magnification None) = GPFM's native mode: level 0, no resampling.",
    )
    target_magnification: float | None = Field(
        None,
        gt=0,
        description=f"Output magnification (e.g. 20), converted as mpp = {MPP_AT_1X:g} / mag; exclusive with "
        "target_mpp.",
    )
    mpp_tolerance: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Relative slack when matching a level's mpp to the target: a level within it is read as is "
        "(no resize), so a 0.2527 µm/px scan serves a 0.25 target, and a target this close to level 0 is not "
        "treated as upsampling.",
    )
    stride_px: int | None = Field(
        None,
        gt=0,
        description="Step between tiles in output px; None = tile_px (no overlap). Less than tile_px overlaps.",
    )
    min_tissue_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Keep tiles whose area is at least this fraction tissue (per the mask); 0 keeps every tile.",
    )
    max_tiles_per_slide: int | None = Field(
        2000,
        gt=0,
        description="Cap on tiles per slide (GPFM: 2,000), sampled without replacement, reproducibly per slide "
        "id and seed; None = no cap.",
    )
    seed: int = Field(0, ge=0, description="Seed of the cap's sampling (combined with a stable hash of the slide id).")
    edge: Literal["drop", "pad"] = Field(
        "pad",
        description="Tiles running past the slide's right/bottom edge: 'pad' (CLAM's default: keep those with "
        "enough tissue, the outside filled white) or 'drop' them (the run manifest's untiled_tissue_fraction then "
        "says how much tissue the edge strips held).",
    )

    @model_validator(mode="after")
    def _one_resolution(self) -> GridConfig:
        if self.target_mpp is not None and self.target_magnification is not None:
            raise ValueError("give target_mpp or target_magnification, not both")
        return self

    @property
    def effective_stride_px(self) -> int:
        """Stride in output px with the None default resolved."""
        return self.tile_px if self.stride_px is None else self.stride_px

    @property
    def requested_mpp(self) -> float | None:
        """Target µm/px from whichever of target_mpp / target_magnification is set; None = native level 0."""
        if self.target_mpp is not None:
            return self.target_mpp
        if self.target_magnification is not None:
            return MPP_AT_1X / self.target_magnification
        return None
