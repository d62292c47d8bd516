"""Block-wise iBOT masks over the student's patch grid (BEiT/DINOv2 scheme, own implementation).

A mask is grown by adding random rectangles ("blocks") until it holds the requested number of patches. Rules:
  - a block covers at least `min_num_patches` patches, except when fewer than that remain to be placed (a final
    top-up, so that small requests on tiny grids are still met); at most `max_num_patches` patches;
  - its aspect ratio h/w is log-uniform in [min_aspect, max_aspect]; it fits in the grid (DINOv2 requires it to
    be strictly smaller, which makes masks impossible on the 2x2 grids of tiny CPU test models);
  - a block is kept only if it adds at least one new patch and no more than the remaining budget, so a mask
    never exceeds its target; after 10 failed tries for one block the mask stops short (measured shortfall on a
    14x14 grid: see tests/unit/data/test_masking.py).
All randomness comes from a `numpy.random.Generator` passed in, so masks are reproducible from a seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gpfm_scale.data.config import MaskConfig

_TRIES_PER_BLOCK = 10


class MaskGenerator:
    """Callable giving one boolean mask [grid_h, grid_w] with (at most, and usually exactly) n masked patches."""

    def __init__(
        self,
        grid_h: int,
        grid_w: int,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_num_patches: int | None = None,
    ) -> None:
        """`max_num_patches` (per block) defaults to half the grid, DINOv2's training setting."""
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"mask grid must be at least 1x1, got {grid_h}x{grid_w}")
        self.grid_h, self.grid_w = grid_h, grid_w
        self.num_patches = grid_h * grid_w
        self.min_num_patches = min_num_patches
        self.max_num_patches = max(1, int(0.5 * self.num_patches) if max_num_patches is None else max_num_patches)
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @classmethod
    def from_config(cls, cfg: MaskConfig, grid_h: int, grid_w: int) -> MaskGenerator:
        max_block = max(1, int(cfg.max_block_fraction * grid_h * grid_w))
        return cls(grid_h, grid_w, cfg.min_num_patches, cfg.min_aspect, cfg.max_aspect, max_block)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator({self.grid_h}x{self.grid_w}, block patches [{self.min_num_patches}, "
            f"{self.max_num_patches}], log aspect {self.log_aspect[0]:.3f}..{self.log_aspect[1]:.3f})"
        )

    def __call__(self, num_masking_patches: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """bool [grid_h, grid_w] with at most `num_masking_patches` True entries."""
        rng = rng if rng is not None else np.random.default_rng()
        mask = np.zeros((self.grid_h, self.grid_w), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Set one random block in `mask` (in place); returns how many patches became newly masked (0: failed)."""
        lower = min(self.min_num_patches, budget)
        for _ in range(_TRIES_PER_BLOCK):
            area = rng.uniform(lower, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if h * w < lower or not (1 <= h <= self.grid_h and 1 <= w <= self.grid_w):
                continue
            top = int(rng.integers(0, self.grid_h - h + 1))
            left = int(rng.integers(0, self.grid_w - w + 1))
            window = mask[top : top + h, left : left + w]
            added = h * w - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                return added
        return 0


def stratified_ratios(n_masked: int, ratio_range: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """n_masked mask ratios, the i-th uniform in the i-th of n_masked equal strata of ratio_range (ascending)."""
    edges = np.linspace(ratio_range[0], ratio_range[1], n_masked + 1)
    return rng.uniform(edges[:-1], edges[1:]) if n_masked > 0 else np.zeros(0)


def masked_token_upperbound(
    n_images: int, ratio_range: tuple[float, float], mask_probability: float, n_tokens: int
) -> int:
    """Sum over masked images of int(n_tokens * upper edge of its stratum): no batch of `sample_masks` exceeds it
    (DINOv2's `upperbound`, used to size fixed buffers of masked tokens)."""
    n_masked = int(n_images * mask_probability)
    edges = np.linspace(ratio_range[0], ratio_range[1], n_masked + 1)
    return int(sum(int(n_tokens * float(e)) for e in edges[1:]))


def sample_masks(
    n_images: int,
    ratio_range: tuple[float, float],
    mask_probability: float,
    generator: MaskGenerator,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Masks for a batch of global crops: bool [n_images, grid_h * grid_w] (row-major over the patch grid).

    int(n_images * mask_probability) images get a mask, with ratios stratified over `ratio_range` (so one batch
    covers the whole range); which images get them is a random permutation (DINOv2 shuffles its mask list), so
    the two global crops of one tile are masked independently. The others get an all-False row.
    """
    n_tokens = generator.num_patches
    n_masked = int(n_images * mask_probability)
    masks = np.zeros((n_images, n_tokens), dtype=bool)
    ratios = stratified_ratios(n_masked, ratio_range, rng)
    rows = rng.permutation(n_images)[:n_masked]
    for row, ratio in zip(rows, ratios):
        masks[row] = generator(int(n_tokens * ratio), rng).reshape(-1)
    return torch.from_numpy(masks)
