"""Optimisation configs with the GPFM/DINOv2 ViT-L recipe values as defaults (REFERENCE.md, "Optimisation").

Two models, each value written once:
- `OptimConfig`: what stays fixed during the run (AdamW betas, clipping, parameter-group rules).
- `ScheduleConfig`: every value that changes with the step (lr, weight decay, teacher EMA momentum, teacher
  temperature, last-layer freeze) and the length of an "epoch" in iterations, which all of them count in.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gpfm_scale.config import StrictModel


class OptimConfig(StrictModel):
    """AdamW and parameter-group settings (the schedule values are in `ScheduleConfig`)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    clip_grad: float = Field(3.0, ge=0.0, description="max grad norm of the backbone, and separately of the "
                             "DINO (and iBOT) head; expert heads are not clipped; 0 disables")
    layerwise_decay: float = Field(0.9, gt=0.0, le=1.0, description="lr x decay^(depth + 1 - layer_id)")
    patch_embed_lr_mult: float = Field(0.2, ge=0.0)
    last_layer_key: str = Field("last_layer", description="parameter-name substring of the DINO head's last layer")


class ScheduleConfig(StrictModel):
    """Per-step schedules. Epoch counts are in units of `iters_per_epoch` iterations (1,250 in the recipe)."""

    iters_per_epoch: int = Field(1250, gt=0, description="iterations per epoch: the unit of every epoch count "
                                 "here and the loader's data epoch (shard draws re-seeded at each start)")
    base_lr: float = Field(4e-4, ge=0.0, description="lr per `lr_reference_batch` images")
    lr_reference_batch: int = Field(1024, gt=0)
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_epochs: float = Field(40.0, ge=0.0)
    weight_decay: float = Field(0.04, ge=0.0)
    weight_decay_end: float = Field(0.4, ge=0.0)
    momentum_teacher: float = Field(0.992, ge=0.0, le=1.0)
    final_momentum_teacher: float = Field(1.0, ge=0.0, le=1.0)
    warmup_teacher_temp: float = Field(0.04, gt=0.0)
    teacher_temp: float = Field(0.07, gt=0.0)
    warmup_teacher_temp_epochs: float = Field(30.0, ge=0.0)
    freeze_last_layer_epochs: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _min_below_base(self) -> ScheduleConfig:
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr {self.min_lr} is above base_lr {self.base_lr}")
        return self
