"""Batch keys are named once (`data/batch_keys.py`): a loader's batch holds exactly those keys, and the packages
that build or read batches use the names, not string literals of their own."""

from __future__ import annotations

import re
from pathlib import Path

from gpfm_scale.data import batch_keys
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader import build_loader
from gpfm_scale.data.loader_config import LoaderConfig
from tests.unit.data.shard_helpers import make_shards

ROOT = Path(__file__).resolve().parents[3]
# Where batches are built or read (the whole package and the benchmarks): each must use the names from batch_keys.
READERS = ("gpfm_scale", "benchmarks")
# Keys distinctive enough to find as literals ("step", "meta", "masks" are also ordinary words elsewhere).
DISTINCT = (*batch_keys.CROP_KEYS, batch_keys.MASK_INDICES, batch_keys.N_MASKED_PER_IMAGE, batch_keys.MASKS_WEIGHT,
            batch_keys.N_MASKED_PATCHES, batch_keys.UPPERBOUND)


def test_a_loader_batch_holds_exactly_the_named_keys(tmp_path):
    paths, _ = make_shards(tmp_path, 1, 2)
    cfg = LoaderConfig(shards=paths, backend="torch", batch_size=2, num_workers=0, shuffle_buffer=0, epoch_length=5,
                       seed=1)
    batch = next(build_loader(cfg, CropConfig(global_size=16, local_size=8, n_local=1), MaskConfig(), (2, 2), 0, 1))
    top = {batch_keys.MASKS, batch_keys.MASK_INDICES, batch_keys.N_MASKED_PER_IMAGE, batch_keys.MASKS_WEIGHT,
           batch_keys.N_MASKED_PATCHES, batch_keys.UPPERBOUND, batch_keys.META, batch_keys.STEP, batch_keys.STATS}
    assert set(batch) == top | set(batch_keys.CROP_KEYS)
    assert set(batch[batch_keys.STATS]) == {batch_keys.STATS_CORRUPT, batch_keys.STATS_SHARD_ERRORS,
                                            batch_keys.STATS_SAMPLES}


def test_no_batch_key_is_written_as_a_literal_outside_batch_keys():
    pattern = re.compile("|".join(rf"""["']{re.escape(key)}["']""" for key in DISTINCT))
    found = []
    for package in READERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "batch_keys.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
