"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest
import torch

from tests.unit.data.shard_helpers import make_shards


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny crops run ~7x faster on one intra-op thread than on two contended ones (measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """(paths, key -> JPEG bytes) of 3 clean shards of one 6-tile slide each, which the loader tests (torch and
    DALI) only read."""
    return make_shards(tmp_path_factory.mktemp("good"), n_shards=3, per_shard=6)
