"""The pretraining worker's count of what the loader skipped (corrupt samples, damaged shards), from real batches
of the torch loader over a damaged shard: what the metrics row and the Prometheus counters report."""

from __future__ import annotations

import tarfile

from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader import build_loader
from gpfm_scale.data.loader_config import LoaderConfig
from gpfm_scale.train.worker import DataProblems
from tests.unit.data.shard_helpers import batch_keys, make_shards


def test_corrupt_samples_and_damaged_shards_are_counted_once_each(tmp_path):
    # one shard: s0/1_0 undecodable, the file cut where s0/4_0 begins (s0/3_0 goes with the damaged tail)
    paths, _ = make_shards(tmp_path, 1, 6, {"s0/1_0": "truncated_jpeg"})
    with tarfile.open(paths[0]) as tf:
        cut = tf.getmember("s0/4_0.jpg").offset
    with open(paths[0], "r+b") as f:
        f.truncate(cut)
    cfg = LoaderConfig(shards=paths, backend="torch", batch_size=2, num_workers=0, shuffle_buffer=0, open_shards=1,
                       random_start=False, epoch_length=10, seed=0)
    loader = build_loader(cfg, CropConfig(global_size=32, local_size=16, n_local=2), MaskConfig(), (2, 2), 0, 1)
    problems = DataProblems()

    first = next(loader)  # s0/0_0, (s0/1_0 skipped), s0/2_0
    problems.add(first["stats"])
    assert batch_keys(first) == ["s0/0_0", "s0/2_0"]
    assert (problems.corrupt_samples, problems.damaged_shards) == (1, 0)
    assert problems.take_new() == (1, 0) and problems.take_new() == (0, 0)

    second = next(loader)  # the damage met, the shard drawn again: s0/0_0, (s0/1_0 skipped), s0/2_0
    problems.add(second["stats"])
    assert batch_keys(second) == ["s0/0_0", "s0/2_0"]
    assert (problems.corrupt_samples, problems.damaged_shards) == (2, 1)
    assert problems.take_new() == (1, 1)
