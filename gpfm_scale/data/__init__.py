"""Reading training data: multi-crop augmentation, iBOT masks, batch collation, synthetic test tiles."""

from gpfm_scale.data.augmentations import MultiCropTransform, RandomHedJitter, hed_jitter, normalize_uint8
from gpfm_scale.data.collate import collate_multicrop
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.masking import MaskGenerator, sample_masks
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles

__all__ = [
    "CropConfig",
    "MaskConfig",
    "MaskGenerator",
    "MultiCropTransform",
    "RandomHedJitter",
    "collate_multicrop",
    "hed_jitter",
    "make_two_class_tiles",
    "normalize_uint8",
    "sample_masks",
]
