"""Collate multi-crop samples into one training batch with iBOT masks (DINOv2 `collate_data_and_cast` layout).

Ordering (DINOv2's): crops are grouped by crop index, then by image. With B images and n local crops,
  global rows: [crop A of images 0..B-1, crop B of images 0..B-1]   -> row i is crop A of image i, row B+i crop B;
  local rows:  [local 0 of images 0..B-1, local 1 of images 0..B-1, ...] -> row j*B+i is local j of image i.
So `x.chunk(2)` splits the global batch into the two views, as the DINO loss needs.

Randomness of the masks comes from a `numpy.random.Generator`. Pass one seeded per (run, step) for exact resume;
with None a seed is drawn from torch's global RNG, which DataLoader seeds differently in each worker (a numpy
Generator created before the workers fork would give every worker the same masks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gpfm_scale.data.batch_keys import (
    CROP_KEYS,
    GLOBAL_CROPS,
    GLOBAL_CROPS_UINT8,
    MASKS,
    MASKS_WEIGHT,
    MASK_INDICES,
    META,
    N_MASKED_PATCHES,
    N_MASKED_PER_IMAGE,
    UPPERBOUND,
)
from gpfm_scale.data.config import MaskConfig
from gpfm_scale.data.masking import MaskGenerator, masked_token_upperbound, sample_masks


def _stack_by_crop(samples: list[dict[str, Any]], key: str) -> torch.Tensor:
    """[n_crops * B, ...] with crop-major order; an empty [0] tensor when samples have no crops under `key`."""
    n_crops = len(samples[0][key])
    if any(len(s[key]) != n_crops for s in samples):
        raise ValueError(f"samples disagree on the number of {key}")
    if n_crops == 0:
        return torch.empty(0)
    return torch.stack([s[key][c] for c in range(n_crops) for s in samples])


def _mask_fields(masks: torch.Tensor) -> dict[str, Any]:
    """Flat masked-token indices and DINOv2's per-token weights from bool masks [n_images, N]."""
    n_per_image = masks.sum(dim=-1)
    mask_indices = masks.flatten().nonzero().flatten()
    weights = (1.0 / n_per_image.clamp(min=1).to(torch.float32)).unsqueeze(-1).expand_as(masks)[masks]
    return {
        MASK_INDICES: mask_indices,
        N_MASKED_PER_IMAGE: n_per_image,
        MASKS_WEIGHT: weights,
        N_MASKED_PATCHES: torch.full((1,), mask_indices.numel(), dtype=torch.long),
    }


def collate_multicrop(
    samples: list[dict[str, Any]],
    mask_cfg: MaskConfig,
    grid_hw: tuple[int, int],
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Batch of B `MultiCropTransform` outputs (plus any metadata keys) -> dict:

      global_crops [2B, 3, G, G] float32, local_crops [nB, 3, L, L] float32 (only if the samples carry floats);
      global_crops_uint8 [2B, 3, G, G], local_crops_uint8 [nB, 3, L, L] uint8 (only if the samples carry them);
      masks bool [2B, N] (N = grid_h * grid_w, row-major patch order) for the student's global crops;
      mask_indices long [M]: positions of True in masks.flatten() (M = masked tokens in the batch);
      n_masked_per_image long [2B]; masks_weight float32 [M]: 1 / (masked tokens of its image), so the weights
        of one masked image sum to 1 and all of them sum to the number of masked images;
      n_masked_patches long [1] (= M); upperbound int (>= M for any draw; DINOv2's buffer size);
      meta: list of B dicts with each sample's other keys (e.g. __key__, json), in batch order.
    A crop key with zero crops (n_local = 0) gives an empty tensor of shape [0].
    """
    if not samples:
        raise ValueError("collate_multicrop needs at least one sample")
    if rng is None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
    out: dict[str, Any] = {k: _stack_by_crop(samples, k) for k in CROP_KEYS if k in samples[0]}
    n_global = len(samples[0].get(GLOBAL_CROPS_UINT8, samples[0].get(GLOBAL_CROPS, [])))
    if n_global == 0:
        raise ValueError("samples carry no global crops")
    n_images = n_global * len(samples)
    generator = MaskGenerator.from_config(mask_cfg, *grid_hw)
    masks = sample_masks(n_images, mask_cfg.ratio_range, mask_cfg.mask_probability, generator, rng)
    out[MASKS] = masks
    out.update(_mask_fields(masks))
    out[UPPERBOUND] = masked_token_upperbound(
        n_images, mask_cfg.ratio_range, mask_cfg.mask_probability, generator.num_patches
    )
    out[META] = [{k: v for k, v in s.items() if k not in CROP_KEYS} for s in samples]
    return out
