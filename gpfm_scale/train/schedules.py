"""Per-step schedules (lr, weight decay, teacher momentum, teacher temperature, last-layer lr) as pure functions.

DINOv2's `CosineScheduler` precomputes arrays; here each value is a closed-form function of the step, so a
resumed run needs only the step number and nothing can drift. Shapes (t = iterations, E = iters_per_epoch):
- lr: linear 0 -> peak over warmup_epochs * E, then half-cosine peak -> min_lr at total_iters, then min_lr.
  peak = base_lr * sqrt(total_batch / 1024) ("sqrt" scaling, DINOv2 `sqrt_wrt_1024`; also "linear", "none").
- weight decay: half-cosine 0.04 -> 0.4 over the run (no warm-up).
- teacher momentum: half-cosine 0.992 -> 1.0 over the run.
- teacher temperature: linear 0.04 -> 0.07 over warmup_teacher_temp_epochs * E, then 0.07.
- last-layer lr: the lr, but 0 for the first freeze_last_layer_epochs * E steps (DINO head's last layer).
Warm-ups reach their end value exactly at step = warm-up length; steps >= total_iters return final values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from gpfm_scale.errors import ConfigError
from gpfm_scale.train.config import ScheduleConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleValues:
    """Every scheduled value at one step."""

    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float


def linear_ramp(step: int, start: float, end: float, ramp_iters: int) -> float:
    """start + (end - start) * step / ramp_iters, held at `end` from step >= ramp_iters."""
    if step >= ramp_iters:
        return end
    return start + (end - start) * max(step, 0) / ramp_iters


def cosine_with_warmup(step: int, peak: float, final: float, total_iters: int, warmup_iters: int = 0) -> float:
    """Linear 0 -> peak over warmup_iters, then final + (peak - final) * (1 + cos(pi * t)) / 2 with t from 0
    to 1 over the remaining steps up to total_iters; `final` from total_iters on."""
    if step < warmup_iters:
        return linear_ramp(step, 0.0, peak, warmup_iters)
    if step >= total_iters:
        return final
    progress = (step - warmup_iters) / (total_iters - warmup_iters)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(cfg: ScheduleConfig, total_batch: int) -> float:
    """Peak lr for a global batch of `total_batch` images: base_lr * sqrt(total_batch / lr_reference_batch)."""
    ratio = total_batch / cfg.lr_reference_batch
    factor = {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[cfg.lr_scaling]
    return cfg.base_lr * factor


@dataclass(frozen=True)
class Schedules:
    """All schedules of one run; `at(step)` is pure (use the optimizer step, 0-based)."""

    cfg: ScheduleConfig
    peak_lr: float
    total_iters: int

    def iters(self, epochs: float) -> int:
        """Epochs (units of iters_per_epoch) -> iterations, rounded."""
        return round(epochs * self.cfg.iters_per_epoch)

    def at(self, step: int) -> ScheduleValues:
        c = self.cfg
        lr = cosine_with_warmup(step, self.peak_lr, c.min_lr, self.total_iters, self.iters(c.warmup_epochs))
        return ScheduleValues(
            lr=lr,
            wd=cosine_with_warmup(step, c.weight_decay, c.weight_decay_end, self.total_iters),
            momentum=cosine_with_warmup(step, c.momentum_teacher, c.final_momentum_teacher, self.total_iters),
            teacher_temp=linear_ramp(
                step, c.warmup_teacher_temp, c.teacher_temp, self.iters(c.warmup_teacher_temp_epochs)
            ),
            last_layer_lr=0.0 if step < self.iters(c.freeze_last_layer_epochs) else lr,
        )


def build_schedules(cfg: ScheduleConfig, total_batch: int, total_iters: int) -> Schedules:
    """Schedules for a run of `total_iters` optimizer steps at a global batch of `total_batch` images."""
    if total_batch <= 0 or total_iters <= 0:
        raise ConfigError(f"total_batch ({total_batch}) and total_iters ({total_iters}) must be positive")
    schedules = Schedules(cfg=cfg, peak_lr=scaled_lr(cfg, total_batch), total_iters=total_iters)
    warmup_iters = schedules.iters(cfg.warmup_epochs)
    if warmup_iters >= total_iters:
        logger.warning(
            "lr warm-up (%d iters) does not end before the run does (%d iters): the cosine phase never starts",
            warmup_iters,
            total_iters,
        )
    logger.info("peak lr %.3g for a global batch of %d (%s scaling)", schedules.peak_lr, total_batch, cfg.lr_scaling)
    return schedules
