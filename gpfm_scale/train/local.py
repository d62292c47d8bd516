"""Single-process trainer of the GPFM objective on an in-memory uint8 tile tensor (CPU or one device).

Used by the objective's training test and the fidelity benchmark. Each step: sample B tiles -> multi-crop + iBOT
masks + collate (CPU) -> expert targets from the in-process experts on the uint8 global crops -> `train_step`
(the distributed worker's step: forward/backward, per-module clipping, AdamW with the scheduled lr / weight
decay, EMA teacher update) on a `LocalEngine`.

Reproducibility: the model is initialised from `seed` (unless a warm-start model is passed); step t draws its
tiles, crops and masks, and its drop-path, from seeds derived from (seed, t) only (`step_seed`, rank 0), so the
same arguments give the same run and a run can be replayed from any step.
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
from gpfm_scale.train.build import build_local_trainer, build_model, student_grid
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.progress import show_metrics, step_bar
from gpfm_scale.train.step import step_seed, train_step
from gpfm_scale.train.warm_start import InitConfig, init_unless_resuming

logger = logging.getLogger(__name__)

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


def sample_batch(
    images: Tensor,
    batch_size: int,
    transform: MultiCropTransform,
    mask_cfg: MaskConfig,
    grid: tuple[int, int],
    batch_seed: int,
) -> dict[str, Any]:
    """B tiles drawn with replacement from images uint8 [n, 3, H, W] -> collated multi-crop batch (CPU)."""
    generator = torch.Generator().manual_seed(batch_seed)
    indices = torch.randint(0, images.shape[0], (batch_size,), generator=generator).tolist()
    samples = [transform(images[i], generator=generator) for i in indices]
    return collate_multicrop(samples, mask_cfg, grid, rng=np.random.default_rng(batch_seed))


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
    if model is None:
        model = build_model(objective_cfg, seed, init)
    elif init is not None:
        init_unless_resuming(model, init, resuming=False)
    model.train()
    experts = build_experts(objective_cfg.model.experts) if experts is None else experts
    if sorted(experts) != sorted(model.expert_names):
        raise ConfigError(f"experts given {sorted(experts)} but the objective names {sorted(model.expert_names)}")
    trainer = build_local_trainer(model, optim_cfg, schedule_cfg, seed=seed, total_batch=batch_size,
                                  total_iters=steps)
    transform, grid = MultiCropTransform(crop_cfg), student_grid(objective_cfg, crop_cfg)
    history: list[dict[str, float]] = []
    bar = step_bar(steps, 0, enabled=True)
    for step in range(steps):
        start = time.perf_counter()
        batch = sample_batch(images, batch_size, transform, mask_cfg, grid, step_seed(seed, 0, step))
        targets = expert_targets(experts, batch[GLOBAL_CROPS_UINT8], grid) if experts else None
        logs = train_step(trainer, batch, targets, step).logs()
        seconds = time.perf_counter() - start
        history.append({"step": float(step), **logs, "step_seconds": seconds})
        show_metrics(bar, logs["total"], batch_size / seconds if seconds > 0 else 0.0)  # logs(): already floats
        bar.update(1)
        if step % 50 == 0 or step == steps - 1:
            logger.info("step %d/%d: total %.4f", step, steps, logs["total"])
    bar.close()
    return LocalRun(model, history)
