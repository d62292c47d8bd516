"""`pretrain` with `init.weights`: the Ray Train workers start from a phase-1 export (tiny_phase1 -> tiny)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gpfm_scale.config import load_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.train.checkpoint import export_teacher
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.stage import run
from tests.integration.pretrain_helpers import TINY_YAML, tiny_config, write_tile_shards

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.mark.slow  # a Ray Train run (worker start-up + DeepSpeed init): ~1 min on 2 cores; tests/unit/train/
# test_warm_start.py covers the init itself, this covers the worker's hook
def test_phase_2_workers_start_from_the_phase_1_export(tmp_path):
    phase1_cfg = load_config(PretrainConfig, TINY_YAML.parent / "tiny_phase1.yaml")
    torch.manual_seed(3)
    phase1 = SSLMetaArch(phase1_cfg.objective)
    export_teacher(phase1, phase1_cfg.objective.model.backbone, tmp_path / "phase1" / "export", 20, is_writer=True,
                   crops=phase1_cfg.crops)
    shards = write_tile_shards(tmp_path / "tiles", n_shards=2, per_shard=16)
    # teacher momentum held at 1: whatever the student learns, the teacher exported after 2 steps is still phase 1's
    cfg = tiny_config(**{"init.weights": str(tmp_path / "phase1" / "export"), "run.num_workers": 1,
                         "run.total_iters": 2, "run.checkpoint_every": 2, "schedule.momentum_teacher": 1.0,
                         "schedule.final_momentum_teacher": 1.0})
    result = run(cfg, str(tmp_path / "phase2"), shards=str(shards))
    assert result.steps == 2
    got = load_file(f"{result.export_dir}/model.safetensors")
    expected = load_file(str(tmp_path / "phase1" / "export" / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_missing_phase_1_export_fails_before_ray_starts_workers(tmp_path):
    cfg = tiny_config(**{"init.weights": str(tmp_path / "nope" / "export")})
    with pytest.raises(ConfigError, match="init.weights: not found"):
        run(cfg, str(tmp_path / "out"), shards=str(write_tile_shards(tmp_path / "tiles", n_shards=1, per_shard=4)))
