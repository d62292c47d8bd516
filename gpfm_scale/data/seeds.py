"""The seeds of the loader's random streams, shared by both backends so that a step's masks match across them.

Every stream is seeded from (run seed, rank, ...) plus a tag word that is different for each purpose, so the
streams of one (seed, rank, ...) never coincide. The tags are listed here once: a new stream takes a new tag.
"""

from __future__ import annotations

import numpy as np
import torch

# Last entropy word of each seed (one per random stream of the loader).
TAG_SHARDS, TAG_SHUFFLE, TAG_AUGMENT, TAG_MASK, TAG_PIPELINE = 1, 2, 3, 4, 5


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy SeedSequence: well mixed, order-sensitive)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_generator(seed: int, rank: int, step: int, index: int) -> torch.Generator:
    """The augmentation random stream of sample `index` of the batch at `step` on `rank`."""
    return torch.Generator().manual_seed(derive_seed(seed, rank, step, index, TAG_AUGMENT))


def batch_mask_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The iBOT-mask random stream of the batch at `step` on `rank` (both backends use it)."""
    return np.random.default_rng([seed, rank, step, TAG_MASK])
