"""Configs of the multi-crop transform and the iBOT masks (REFERENCE.md "Multi-crop and masking").

Every default is the GPFM/DINOv2 recipe value; pathology-specific augmentations (vertical flip, 90-degree
rotations, HED stain jitter) exist but are off by default so that the default run reproduces GPFM.

Gaussian blur: DINOv2's `GaussianBlur(p)` passes `1 - p` to `RandomApply` (dinov2 data/transforms.py:17-21,
dinov2 PR #411), so the code GPFM ran blurred global crop 1 never, global crop 2 with p 0.9 and the locals with
p 0.5, although it is written p = 1.0 / 0.1 / 0.5. The recipe is what ran: `blur_probabilities: effective` (the
default); `nominal` gives the written values; an explicit [global 1, global 2, local] list sets any other odds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gpfm_scale.config import StrictModel
from gpfm_scale.contracts.model_input import IMAGENET_MEAN, IMAGENET_STD

# Blur odds (global crop 1, global crop 2, local crops) by preset name; see the module docstring.
BLUR_PRESETS: dict[str, tuple[float, float, float]] = {"effective": (0.0, 0.9, 0.5), "nominal": (1.0, 0.1, 0.5)}


def _check_range(name: str, lo: float, hi: float) -> None:
    if lo > hi:
        raise ValueError(f"{name}: lower bound {lo} is above upper bound {hi}")


class CropConfig(StrictModel):
    """Multi-crop augmentation of one tile: 2 global crops + `n_local` local crops (sizes in pixels).

    `scale` ranges are fractions of the input tile's area (torchvision RandomResizedCrop semantics); the aspect
    ratio of each crop is drawn log-uniformly in `crop_ratio` before resizing to a square.
    """

    global_size: int = Field(224, ge=8)
    global_scale: tuple[float, float] = (0.32, 1.0)
    n_local: int = Field(8, ge=0)
    local_size: int = Field(98, ge=8)
    local_scale: tuple[float, float] = (0.05, 0.32)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    # Colour jitter factors as in torchvision ColorJitter: brightness/contrast/saturation in [1-x, 1+x], hue in [-h, h].
    jitter_brightness: float = Field(0.4, ge=0.0)
    jitter_contrast: float = Field(0.4, ge=0.0)
    jitter_saturation: float = Field(0.2, ge=0.0)
    jitter_hue: float = Field(0.1, ge=0.0, le=0.5)
    jitter_p: float = Field(0.8, ge=0.0, le=1.0)
    grayscale_p: float = Field(0.2, ge=0.0, le=1.0)
    blur_probabilities: Literal["effective", "nominal"] | tuple[float, float, float] = Field(
        "effective", description="Gaussian blur odds of global crop 1, global crop 2, each local crop: 'effective' "
        "(0, 0.9, 0.5: what GPFM's code ran), 'nominal' (1, 0.1, 0.5: what it wrote) or a [g1, g2, local] list.")
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = Field(9, ge=3)
    solarize_p_global2: float = Field(0.2, ge=0.0, le=1.0)
    solarize_threshold: int = Field(128, ge=0, le=255)
    # Pathology options (tiles have no canonical orientation; stains vary between labs). Off by default.
    vflip_p: float = Field(0.0, ge=0.0, le=1.0)
    rot90_p: float = Field(0.0, ge=0.0, le=1.0)
    # HED stain jitter strength s: per stain alpha ~ U[1-s, 1+s], beta ~ U[-s, s] in scikit-image stain units;
    # 0 = off; 0.01-0.05 useful (see augmentations.py for measured effect sizes).
    hed_jitter: float = Field(0.0, ge=0.0, le=1.0)
    hed_jitter_p: float = Field(1.0, ge=0.0, le=1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # False: return only uint8 crops and normalise later (on device): float crops are 4x the bytes to ship.
    normalize: bool = True

    @field_validator("blur_probabilities", mode="before")
    @classmethod
    def _blur_probabilities(cls, value: object) -> str | tuple[float, float, float]:
        """One clear message for both forms (pydantic's own union errors list every branch)."""
        if isinstance(value, str) and value in BLUR_PRESETS:
            return value
        if isinstance(value, (list, tuple)) and len(value) == 3:
            if all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0 for p in value):
                return (float(value[0]), float(value[1]), float(value[2]))
        raise ValueError(f"must be one of {sorted(BLUR_PRESETS)} or [global1, global2, local] in [0, 1]")

    @property
    def blur_p(self) -> tuple[float, float, float]:
        """Blur probabilities of (global crop 1, global crop 2, each local crop), the preset resolved."""
        if isinstance(self.blur_probabilities, str):
            return BLUR_PRESETS[self.blur_probabilities]
        return self.blur_probabilities

    @model_validator(mode="after")
    def _ranges(self) -> CropConfig:
        _check_range("global_scale", *self.global_scale)
        _check_range("local_scale", *self.local_scale)
        _check_range("crop_ratio", *self.crop_ratio)
        _check_range("blur_sigma", *self.blur_sigma)
        if not (0.0 < self.global_scale[0] and self.global_scale[1] <= 1.0):
            raise ValueError(f"global_scale must lie in (0, 1], got {self.global_scale}")
        if not (0.0 < self.local_scale[0] and self.local_scale[1] <= 1.0):
            raise ValueError(f"local_scale must lie in (0, 1], got {self.local_scale}")
        if self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        if min(self.std) <= 0.0:
            raise ValueError(f"std must be positive, got {self.std}")
        return self


class MaskConfig(StrictModel):
    """Block-wise iBOT masks on the student's global crops (DINOv2 defaults).

    `mask_probability` is the fraction of the 2B global crops that get a mask; their mask ratios are stratified in
    `ratio_range`. Blocks cover at least `min_num_patches` patches (except a final top-up smaller than that),
    at most `max_block_fraction` of the grid, with aspect ratio (h/w) log-uniform in [min_aspect, max_aspect]
    (None: 1/min_aspect).
    """

    mask_probability: float = Field(0.5, ge=0.0, le=1.0)
    ratio_range: tuple[float, float] = (0.1, 0.5)
    min_num_patches: int = Field(4, ge=1)
    max_block_fraction: float = Field(0.5, gt=0.0, le=1.0)
    min_aspect: float = Field(0.3, gt=0.0)
    max_aspect: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _ranges(self) -> MaskConfig:
        _check_range("ratio_range", *self.ratio_range)
        if not (0.0 <= self.ratio_range[0] and self.ratio_range[1] <= 1.0):
            raise ValueError(f"ratio_range must lie in [0, 1], got {self.ratio_range}")
        if self.max_aspect is not None:
            _check_range("min_aspect/max_aspect", self.min_aspect, self.max_aspect)
        return self
