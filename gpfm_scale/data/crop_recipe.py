"""The multi-crop recipe: which crops one tile gives and what each kind of crop gets (DINOv2/GPFM).

Both loader backends read it (`augmentations.MultiCropTransform` for torch, `dali_pipeline` for DALI), so a crop
size, area range, count or the odds of a step cannot differ between them. Per tile, in batch order:
  global crop 1: global_size px, area in global_scale, blur with the first `blur_p`, no solarize;
  global crop 2: the same, with the second `blur_p` and solarize with `solarize_p_global2`;
  n_local local crops: local_size px, area in local_scale, the third `blur_p`, no solarize.
Flip, rotation, colour jitter, grayscale and HED odds are the same for every crop. How strong each step is (jitter
factors, blur sigma and kernel, solarize threshold, HED strength) stays in `CropConfig`: only the odds and the
geometry vary per crop.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpfm_scale.data.config import CropConfig


@dataclass(frozen=True)
class CropKind:
    """One kind of crop: output side `size` (px), area range `scale` (fraction of the tile's area), aspect range
    `ratio` (w/h, log-uniform), and the probability of each random step applied to it."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip_p: float
    vflip_p: float
    rot90_p: float
    hed_jitter_p: float
    jitter_p: float
    grayscale_p: float
    blur_p: float
    solarize_p: float


@dataclass(frozen=True)
class CropRecipe:
    """The crops of one tile: `global_crops` (2, the teacher's views) then `local_crops` (n_local), in batch order."""

    global_crops: tuple[CropKind, ...]
    local_crops: tuple[CropKind, ...]

    @property
    def crops(self) -> tuple[CropKind, ...]:
        """Every crop of a tile in output order: global crops, then local crops."""
        return self.global_crops + self.local_crops

    @classmethod
    def from_config(cls, cfg: CropConfig) -> CropRecipe:
        """The recipe `cfg` describes (see the module docstring for what differs between the crops)."""
        blur_global1, blur_global2, blur_local = cfg.blur_p

        def kind(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> CropKind:
            return CropKind(size=size, scale=scale, ratio=cfg.crop_ratio, hflip_p=cfg.hflip_p, vflip_p=cfg.vflip_p,
                            rot90_p=cfg.rot90_p, hed_jitter_p=cfg.hed_jitter_p, jitter_p=cfg.jitter_p,
                            grayscale_p=cfg.grayscale_p, blur_p=blur_p, solarize_p=solarize_p)

        global1 = kind(cfg.global_size, cfg.global_scale, blur_global1, 0.0)
        global2 = kind(cfg.global_size, cfg.global_scale, blur_global2, cfg.solarize_p_global2)
        local = kind(cfg.local_size, cfg.local_scale, blur_local, 0.0)
        return cls(global_crops=(global1, global2), local_crops=(local,) * cfg.n_local)
