"""The keys of a training batch: the contract between the loaders (writers) and the model and trainers (readers).

A batch is the dict `collate.collate_multicrop` builds (shapes there), plus what the loaders add. Readers use these
names rather than string literals, so a renamed key fails at import instead of as a KeyError mid-run.
"""

from __future__ import annotations

# Crops, crop-major (see collate.py): float32 normalised and uint8 before normalisation (what experts receive).
GLOBAL_CROPS = "global_crops"  # float32 [2B, 3, G, G]
LOCAL_CROPS = "local_crops"  # float32 [n_local * B, 3, L, L]
GLOBAL_CROPS_UINT8 = "global_crops_uint8"  # uint8 [2B, 3, G, G]
LOCAL_CROPS_UINT8 = "local_crops_uint8"  # uint8 [n_local * B, 3, L, L]
CROP_KEYS = (GLOBAL_CROPS, LOCAL_CROPS, GLOBAL_CROPS_UINT8, LOCAL_CROPS_UINT8)

# iBOT masks of the student's global crops.
MASKS = "masks"  # bool [2B, N]
MASK_INDICES = "mask_indices"  # long [M]
N_MASKED_PER_IMAGE = "n_masked_per_image"  # long [2B]
MASKS_WEIGHT = "masks_weight"  # float32 [M]
N_MASKED_PATCHES = "n_masked_patches"  # long [1]
UPPERBOUND = "upperbound"  # int

META = "meta"  # list of B dicts: each sample's other keys (__key__, shard, json)

# Added by the loaders.
STEP = "step"  # int: the global step the batch is for
STATS = "stats"  # dict of the per-batch counts below
STATS_CORRUPT = "corrupt"  # corrupt samples skipped while filling the batch
STATS_SHARD_ERRORS = "shard_errors"  # damaged shards met while filling the batch
STATS_SAMPLES = "samples"  # samples in the batch
