"""The shipped pretraining configs: GPFM's two phases, its global batch, its expert inputs; tiny has both phases too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from gpfm_scale.cli import main
from gpfm_scale.config import load_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.train.checkpoint import export_teacher
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.warm_start import InitConfig, apply_init

CONFIGS = Path(__file__).resolve().parents[3] / "gpfm_scale" / "configs"


def _load(name: str, **overrides: object) -> PretrainConfig:
    return load_config(PretrainConfig, CONFIGS / f"{name}.yaml", overrides)


def test_gpfm_phase_2_is_the_recipe(capsys) -> None:
    assert main(["pretrain", "--config", str(CONFIGS / "vitl14_gpfm.yaml"), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = PretrainConfig.model_validate(printed)
    assert cfg.run.global_batch_size == cfg.loader.batch_size * cfg.run.num_workers == 1536
    assert cfg.init.weights == Path("/mnt/gpfm/runs/phase1/export") and not cfg.init.heads
    assert cfg.objective.model.backbone.grad_checkpointing
    assert [(e.name, e.preprocessing) for e in cfg.objective.model.experts] == [
        ("uni", "gpfm_original"), ("phikon", "gpfm_original"), ("conch", "gpfm_original")]
    # FLOPs per expert GPU at 224 px: UNI 61.6 GMACs alone, Phikon + CONCH 35.1 (docs/scaling.md)
    assert cfg.expert_placement.assignment == [["uni"], ["phikon", "conch"]]
    assert cfg.run.num_workers == 2 * (8 - cfg.expert_placement.expert_gpus_per_node)  # two 8-GPU nodes


def test_gpfm_phase_1_is_dinov2_alone_at_the_same_batch() -> None:
    phase1, phase2 = _load("vitl14_dinov2_phase1"), _load("vitl14_gpfm")
    assert phase1.objective.model.experts == [] and phase1.init.weights is None
    assert phase1.run.global_batch_size == phase1.loader.batch_size * phase1.run.num_workers == 1536
    assert phase1.run.num_workers == 16 and phase1.loader.batch_size == 96  # GPFM's 96 x 16
    assert phase1.run.total_iters == 250_000 and phase2.run.total_iters == 500_000
    assert phase1.objective.model.backbone == phase2.objective.model.backbone  # its export fits phase 2
    assert phase1.objective.model.head == phase2.objective.model.head


def test_a_declared_global_batch_must_be_what_the_layout_gives() -> None:
    with pytest.raises(ConfigError, match=r"run\.global_batch_size 1536 != loader\.batch_size 128 x "
                                          r"run\.num_workers 8 = 1024"):
        _load("vitl14_gpfm", **{"run.num_workers": 8})
    assert _load("vitl14_gpfm", **{"run.num_workers": 8, "run.global_batch_size": None}).run.num_workers == 8


def test_tiny_phase_1_export_starts_tiny_phase_2(tmp_path: Path) -> None:
    phase1_cfg, phase2_cfg = _load("tiny_phase1"), _load("tiny")
    assert phase1_cfg.objective.model.experts == [] and phase2_cfg.objective.model.experts
    torch.manual_seed(0)
    phase1 = SSLMetaArch(phase1_cfg.objective)
    export_teacher(phase1, phase1_cfg.objective.model.backbone, tmp_path / "export", step=20, is_writer=True,
                   crops=phase1_cfg.crops)
    torch.manual_seed(1)
    phase2 = SSLMetaArch(phase2_cfg.objective)
    apply_init(phase2, InitConfig(weights=tmp_path / "export"))
    expected = phase1.teacher["backbone"].state_dict()
    for side in (phase2.teacher, phase2.student):
        got = side["backbone"].state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
