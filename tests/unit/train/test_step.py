"""`train_step` on the single-process engine: the step's randomness (drop-path) comes from (seed, rank, step), so
a run restored from a state after step t repeats step t + 1 exactly, in every trainer, whatever the process drew
in between; and the step applies the schedules it reports."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from gpfm_scale.data.augmentations import MultiCropTransform
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.models.config import BackboneConfig, HeadConfig, ModelConfig
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.build import build_local_trainer, build_model, student_grid
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.local import sample_batch
from gpfm_scale.train.step import Trainer, train_step

OBJECTIVE = ObjectiveConfig(model=ModelConfig(
    backbone=BackboneConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.3),
    head=HeadConfig(hidden_dim=64, bottleneck_dim=16, num_prototypes=64, expert_bottleneck_dim=16), experts=[]))
CROP = CropConfig(global_size=32, local_size=16, n_local=2, blur_kernel=3)
SCHEDULE = ScheduleConfig(iters_per_epoch=2, warmup_epochs=1, warmup_teacher_temp_epochs=1,
                          freeze_last_layer_epochs=0.5, base_lr=1e-3, lr_reference_batch=4)


def _trainer() -> Trainer:
    return build_local_trainer(build_model(OBJECTIVE, seed=3), OptimConfig(), SCHEDULE, seed=3, total_batch=4,
                               total_iters=10)


def _batches(n: int) -> list[dict]:
    tiles = torch.randint(0, 256, (8, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = student_grid(OBJECTIVE, CROP)
    return [sample_batch(tiles, 4, MultiCropTransform(CROP), MaskConfig(min_num_patches=2), grid, i) for i in range(n)]


def _restored(trainer: Trainer) -> Trainer:
    """A new trainer holding `trainer`'s model and optimiser state (what a resumed run loads)."""
    other = _trainer()
    other.model.load_state_dict(copy.deepcopy(trainer.model.state_dict()))
    other.engine.optimizer.load_state_dict(copy.deepcopy(trainer.engine.optimizer.state_dict()))
    return other


def test_a_restored_trainer_repeats_the_next_step_exactly() -> None:
    first, second = _batches(2)
    trainer = _trainer()
    train_step(trainer, first, None, 0)
    resumed, other_rank = _restored(trainer), replace(_restored(trainer), rank=1)
    torch.manual_seed(12345)  # whatever the process drew in between does not matter
    expected = train_step(trainer, second, None, 1).logs()
    torch.rand(100)
    assert train_step(resumed, second, None, 1).logs() == expected
    assert train_step(other_rank, second, None, 1).logs()["total"] != expected["total"]  # drop-path draws differ


def test_the_step_runs_with_the_schedule_of_its_step_number() -> None:
    trainer = _trainer()
    result = train_step(trainer, _batches(1)[0], None, 4)
    assert result.schedule == trainer.schedules.at(4)
    groups = trainer.engine.optimizer.param_groups
    assert {g["lr"] for g in groups if g["is_last_layer"]} == {result.schedule.last_layer_lr}
    assert result.logs()["teacher_temp"] == SCHEDULE.teacher_temp  # warm-up over at step 2
    assert result.clip_grad == OptimConfig().clip_grad and set(result.grad_norms) == {"backbone", "dino_head"}
