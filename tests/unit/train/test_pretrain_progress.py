"""Pretraining shows a progress bar over steps with the loss and images/s (issue 13.6)."""

from __future__ import annotations

import re

import pytest
import torch

from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.models.config import BackboneConfig, HeadConfig, ModelConfig
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.local import train_local


def test_train_local_draws_a_step_bar_with_loss_and_images_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    backbone = BackboneConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    head = HeadConfig(hidden_dim=48, bottleneck_dim=16, num_prototypes=64)
    schedule = ScheduleConfig(iters_per_epoch=2, warmup_epochs=0.0, warmup_teacher_temp_epochs=0.5,
                              freeze_last_layer_epochs=0.0)
    tiles = torch.randint(0, 256, (8, 3, 48, 48), dtype=torch.uint8)
    run = train_local(ObjectiveConfig(model=ModelConfig(backbone=backbone, head=head, experts=[])), OptimConfig(), schedule,
                      CropConfig(global_size=32, local_size=16, n_local=2, blur_kernel=3),
                      MaskConfig(min_num_patches=2), tiles, steps=2, batch_size=4, seed=0, experts={})
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").strip().splitlines()
    final = lines[-1] if lines else ""
    assert re.search(r"pretraining: 100%.* 2/2 .*loss (\d+\.\d+), \d+\.\d img/s", final), err
    assert f"loss {run.history[-1]['total']:.4f}" in final
