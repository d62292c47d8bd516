"""Each pretraining value has one owner: the loader gets the run's seed and the schedule's epoch, the backbone is
made for the global crops, and a key that moved is refused naming its owner (issue 11.2)."""

from __future__ import annotations

import pytest

from gpfm_scale.cli import main
from gpfm_scale.data.shard_stream import build_loader
from gpfm_scale.errors import ConfigError
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.schedules import build_schedules
from tests.integration.pretrain_helpers import TINY_YAML, tiny_config
from tests.unit.data.shard_helpers import batch_keys, make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    paths, _ = make_shards(tmp_path_factory.mktemp("shards"), 3, 12, size=32)
    return paths


def _keys(cfg: PretrainConfig, n: int) -> list[list[str]]:
    """The tile keys of the first `n` batches rank 0 reads with the config's loader."""
    side = cfg.objective.model.backbone.grid_size
    it = build_loader(cfg.loader_config(), cfg.crops, cfg.masks, (side, side), 0, 1)
    return [batch_keys(next(it)) for _ in range(n)]


def _cfg(shards: list[str], **overrides: object) -> PretrainConfig:
    return tiny_config(**{"loader.shards": shards, "loader.batch_size": 4, "loader.shuffle_buffer": 8, **overrides})


def test_the_loader_draws_its_data_order_from_run_seed(shards):
    cfg = _cfg(shards, **{"run.seed": 5})
    assert cfg.loader_config().seed == 5
    assert _keys(cfg, 3) == _keys(_cfg(shards, **{"run.seed": 5}), 3)
    assert _keys(cfg, 3) != _keys(_cfg(shards, **{"run.seed": 6}), 3)


def test_one_epoch_length_sets_the_schedules_and_the_loaders_data_epoch(shards):
    """iters_per_epoch 3: warm-up of one epoch ends at step 3, and the loader re-seeds its stream at step 3 (with
    a 100-step epoch the first three batches are the same and the fourth is not)."""
    short = _cfg(shards, **{"schedule.iters_per_epoch": 3})
    long = _cfg(shards, **{"schedule.iters_per_epoch": 100})
    assert short.loader_config().epoch_length == 3
    assert build_schedules(short.schedule, total_batch=8, total_iters=20).iters(short.schedule.warmup_epochs) == 3
    a, b = _keys(short, 4), _keys(long, 4)
    assert a[:3] == b[:3] and a[3] != b[3]


def test_backbone_size_other_than_the_global_crops_is_refused():
    with pytest.raises(ConfigError, match=r"objective\.model\.backbone\.img_size 32 != crops\.global_size 48"):
        tiny_config(**{"crops.global_size": 48})
    assert tiny_config(**{"crops.global_size": 48, "objective.model.backbone.img_size": 48}).crops.global_size == 48


@pytest.mark.parametrize(("old", "owner"), [("loader.seed", "run.seed"),
                                            ("loader.epoch_length", "schedule.iters_per_epoch")])
def test_a_moved_key_is_refused_naming_its_owner(capsys, old, owner):
    assert main(["pretrain", "--config", str(TINY_YAML), "--set", f"{old}=3", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"'{old}' was removed: set '{owner}'" in err and "\n" not in err, err
