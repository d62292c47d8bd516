"""The worker's trainer (DeepSpeed ZeRO-2, as `train_loop_per_worker` builds it) and the single-process trainer
(`LocalEngine`, as `train_local` and the benchmarks' baselines build it) run the same step.

Both come from `build_pretrain_trainer` with the tiny recipe (drop-path 0.1, two experts, per-module clipping
to a limit that bites) and take two `train_step`s on the same real collated batches and expert targets: the
losses, the pre-clip gradient norms, the student's (fp32 master) weights and the EMA teacher must agree. One
DeepSpeed rank in this process (`single_rank_group`); fp32, so the only differences are DeepSpeed's flat
partitions (summation order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpfm_scale.config import apply_overrides, build_config, read_yaml
from gpfm_scale.data.augmentations import MultiCropTransform
from gpfm_scale.train.build import build_pretrain_trainer, student_grid
from gpfm_scale.train.engine import fp32_master
from gpfm_scale.train.local import build_experts, expert_targets, sample_batch
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.step import Trainer, train_step
from tests.integration.deepspeed_helpers import single_rank_group

TINY = Path(__file__).resolve().parents[2] / "gpfm_scale" / "configs" / "tiny.yaml"
STEPS, CLIP = 2, 0.05  # the tiny model's module norms are ~0.1-1: 0.05 clips every step


@pytest.fixture(scope="module", autouse=True)
def _one_rank():
    with single_rank_group():
        yield


def _cfg() -> PretrainConfig:
    return build_config(PretrainConfig, apply_overrides(read_yaml(TINY), {
        "deepspeed.precision": "fp32", "run.num_workers": 1, "optim.clip_grad": CLIP}), "tiny.yaml")


def _run(trainer: Trainer, batches: list) -> list[dict[str, float]]:
    return [train_step(trainer, batch, targets, step).logs() for step, (batch, targets) in enumerate(batches)]


def test_worker_and_local_trainers_take_the_same_steps() -> None:
    cfg = _cfg()
    cpu = torch.device("cpu")
    grid = student_grid(cfg.objective, cfg.crops)
    tiles = torch.randint(0, 256, (16, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    experts = build_experts(cfg.objective.model.experts)
    batches = []
    for step in range(STEPS):
        batch = sample_batch(tiles, cfg.loader.batch_size, MultiCropTransform(cfg.crops), cfg.masks, grid, step)
        batches.append((batch, expert_targets(experts, batch["global_crops_uint8"], grid)))

    worker = build_pretrain_trainer(cfg, cpu)
    assert worker.engine.zero_optimization_stage() == 2  # the DeepSpeed engine, as the worker runs it
    local = build_pretrain_trainer(cfg, cpu, use_deepspeed=False)
    worker_logs, local_logs = _run(worker, batches), _run(local, batches)

    for w, loc in zip(worker_logs, local_logs):
        assert w.keys() == loc.keys()
        assert w["grad_norm/backbone"] > CLIP and w["grad_norm/dino_head"] > CLIP  # clipping bites
        for key in w:
            assert w[key] == pytest.approx(loc[key], rel=1e-4, abs=1e-6), key
    assert worker_logs[1]["total"] != worker_logs[0]["total"]
    local_params = dict(local.model.student.named_parameters())
    for name, param in worker.model.student.named_parameters():
        torch.testing.assert_close(fp32_master(param), local_params[name].detach(), rtol=1e-4, atol=1e-6, msg=name)
    local_teacher = dict(local.model.teacher.named_buffers())
    for name, tensor in worker.model.teacher.named_buffers():
        torch.testing.assert_close(tensor, local_teacher[name], rtol=1e-5, atol=1e-7, msg=name)
