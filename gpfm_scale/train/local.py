"""Single-process trainer of the GPFM objective on an in-memory uint8 tile tensor (CPU or one device).

Used by the objective's training test, by `benchmarks/bench_objective.py`, and as the in-process baseline of the
distributed job. Each step: sample B tiles -> multi-crop + iBOT masks + collate (CPU) -> expert targets from the
in-process experts on the uint8 global crops -> forward/backward -> clip the backbone's and the DINO head's gradients
(each by its own norm, as the distributed worker does) -> AdamW step
with the scheduled lr / weight decay -> EMA teacher update with the scheduled momentum.

Reproducibility: the model is initialised from `seed` (unless a warm-start model is passed); step t draws its
tiles, crops and masks from a seed derived from (seed, t) only, so the same arguments give the same run and a
run can be replayed from any step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpfm_scale.data.augmentations import MultiCropTransform
from gpfm_scale.data.batch_keys import GLOBAL_CROPS_UINT8
from gpfm_scale.data.collate import collate_multicrop
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.models.experts import Expert, build_expert
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.engine import clip_grad_norms
from gpfm_scale.train.param_groups import apply_schedule, build_param_groups
from gpfm_scale.train.schedules import ScheduleValues, build_schedules
from gpfm_scale.train.warm_start import InitConfig, init_unless_resuming

logger = logging.getLogger(__name__)

_STEP_SEED_STRIDE = 1_000_003  # a prime: (seed, step) -> distinct per-step seeds for any realistic run length


@dataclass(frozen=True)
class LocalRun:
    """The trained meta-architecture (student and teacher) and one dict of floats per step."""

    model: SSLMetaArch
    history: list[dict[str, float]]


def build_experts(cfgs: list[ExpertConfig]) -> dict[str, Expert]:
    """Frozen in-process experts by name (weights loaded from the local files the configs name)."""
    return {cfg.name: build_expert(cfg) for cfg in cfgs}


def expert_targets(
    experts: Mapping[str, Expert], global_crops_uint8: Tensor, grid: tuple[int, int]
) -> dict[str, dict[str, Tensor | None]]:
    """{name: {"cls": [2B, D_e], "patch": [2B, h*w, D_e] | None}} on the unmasked uint8 global crops [2B, 3, G, G],
    patch tokens resampled to the student's (h, w) grid."""
    return {name: expert(global_crops_uint8, grid) for name, expert in experts.items()}


def student_grid(objective_cfg: ObjectiveConfig, crop_cfg: CropConfig) -> tuple[int, int]:
    """(h, w) patches of a global crop for the student; the crop must be a whole number of patches."""
    patch = objective_cfg.model.backbone.patch_size
    if crop_cfg.global_size % patch:
        raise ConfigError(f"crop.global_size {crop_cfg.global_size} is not a multiple of the patch size {patch}")
    side = crop_cfg.global_size // patch
    return side, side


def sample_batch(
    images: Tensor,
    batch_size: int,
    transform: MultiCropTransform,
    mask_cfg: MaskConfig,
    grid: tuple[int, int],
    step_seed: int,
) -> dict[str, Any]:
    """B tiles drawn with replacement from images uint8 [n, 3, H, W] -> collated multi-crop batch (CPU)."""
    generator = torch.Generator().manual_seed(step_seed)
    indices = torch.randint(0, images.shape[0], (batch_size,), generator=generator).tolist()
    samples = [transform(images[i], generator=generator) for i in indices]
    return collate_multicrop(samples, mask_cfg, grid, rng=np.random.default_rng(step_seed))


def build_optimizer(model: SSLMetaArch, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups (lr and weight decay are set per step by `apply_schedule`)."""
    groups = build_param_groups(model.student, optim_cfg)
    return torch.optim.AdamW(groups, lr=0.0, betas=optim_cfg.betas, eps=optim_cfg.eps)


def train_step(
    model: SSLMetaArch,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, Any],
    targets: Mapping[str, Mapping[str, Tensor | None]] | None,
    values: ScheduleValues,
    clip_grad: float,
) -> dict[str, float]:
    """One optimiser step on `batch`; returns the loss/health floats plus the scheduled values and the
    pre-clipping gradient norm of each clipped module (`grad_norm/<module>`)."""
    apply_schedule(optimizer, values)
    optimizer.zero_grad(set_to_none=True)
    logs = model.forward_backward(batch, targets, values.teacher_temp)
    norms = clip_grad_norms(model.clipped_modules(), clip_grad, partitioned=False)
    logs.update({f"grad_norm/{name}": float(norm) for name, norm in norms.items()})
    optimizer.step()
    model.update_teacher(values.momentum)
    logs.update(lr=values.lr, wd=values.wd, momentum=values.momentum, teacher_temp=values.teacher_temp)
    return logs


def train_local(
    objective_cfg: ObjectiveConfig,
    optim_cfg: OptimConfig,
    schedule_cfg: ScheduleConfig,
    crop_cfg: CropConfig,
    mask_cfg: MaskConfig,
    images: Tensor,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    experts: Mapping[str, Expert] | None = None,
    model: SSLMetaArch | None = None,
    init: InitConfig | None = None,
) -> LocalRun:
    """Train the objective for `steps` steps of `batch_size` tiles from images uint8 [n, 3, H, W] (on CPU).

    `experts`: already built in-process experts (e.g. random-init stand-ins, or loaded once and shared); when
    None they are built from `objective_cfg.model.experts` with `build_expert` (weights from local files).
    `model`: a warm start (e.g. heads on a pretrained backbone, as GPFM starts from a run without experts),
    built from `objective_cfg` and trained in place; None builds a random-init one from `seed`. `init`: load
    phase-1 weights into it first (`train/warm_start.py`, as `pretrain`'s `init`). The optimiser and the
    schedules always start fresh.
    """
    if not crop_cfg.normalize:
        raise ConfigError("crop.normalize must be true for train_local: the student takes the float crops")
    torch.manual_seed(seed)
    model = SSLMetaArch(objective_cfg) if model is None else model
    if init is not None:
        init_unless_resuming(model, init, resuming=False)
    model.train()
    experts = build_experts(objective_cfg.model.experts) if experts is None else experts
    if sorted(experts) != sorted(model.expert_names):
        raise ConfigError(f"experts given {sorted(experts)} but the objective names {sorted(model.expert_names)}")
    optimizer = build_optimizer(model, optim_cfg)
    schedules = build_schedules(schedule_cfg, total_batch=batch_size, total_iters=steps)
    transform, grid = MultiCropTransform(crop_cfg), student_grid(objective_cfg, crop_cfg)
    history: list[dict[str, float]] = []
    for step in range(steps):
        start = time.perf_counter()
        batch = sample_batch(images, batch_size, transform, mask_cfg, grid, seed * _STEP_SEED_STRIDE + step)
        targets = expert_targets(experts, batch[GLOBAL_CROPS_UINT8], grid) if experts else None
        logs = train_step(model, optimizer, batch, targets, schedules.at(step), optim_cfg.clip_grad)
        history.append({"step": float(step), **logs, "step_seconds": time.perf_counter() - start})
        if step % 50 == 0 or step == steps - 1:
            logger.info("step %d/%d: total %.4f", step, steps, logs["total"])
    return LocalRun(model, history)
