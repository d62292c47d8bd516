"""Every setting of `gpfm-scale pretrain`, composed from the configs of its parts (each default written once)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpfm_scale.config import StrictModel
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader_config import LoaderConfig
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.engine import DeepSpeedConfig
from gpfm_scale.train.expert_config import ExpertPlacementConfig


class RunSettings(StrictModel):
    """How long, how wide, how often: what scales with the cluster rather than the recipe."""

    num_workers: int = Field(default=16, ge=1, description="Ray Train workers (one GPU each when use_gpu).")
    use_gpu: Literal["auto", "yes", "no"] = Field(default="auto", description="auto: yes when the cluster has GPUs.")
    cpus_per_worker: float = Field(default=8.0, gt=0, description="CPU slots per worker (data loading runs there).")
    total_iters: int = Field(default=500_000, ge=1, description="Optimiser steps of the whole run (GPFM: 500k).")
    stop_after_steps: int | None = Field(
        default=None, ge=1, description="Checkpoint and stop at this step without finishing (time-boxed or "
        "preemptible jobs); schedules still follow total_iters, and --resume continues.")
    checkpoint_every: int = Field(default=2_500, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(default=3, ge=1, description="Checkpoints kept (the newest ones).")
    log_every: int = Field(default=10, ge=1, description="Steps between metric reports (metrics.jsonl, Prometheus).")
    max_failures: int = Field(default=3, ge=0, description="Worker-group restarts from the last checkpoint.")
    seed: int = Field(default=0, ge=0, description="Seeds model init, augmentation and data order.")
    name: str = Field(default="pretrain", pattern=r"^[A-Za-z0-9_.-]+$", description="Ray Train run name.")
    ray_address: str | None = Field(default=None, description="Ray cluster; default RAY_ADDRESS, else local.")


class PretrainConfig(StrictModel):
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="Models and losses.")
    crops: CropConfig = Field(default_factory=CropConfig, description="Multi-crop augmentation.")
    masks: MaskConfig = Field(default_factory=MaskConfig, description="iBOT masking.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="AdamW and its parameter groups.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="lr, wd, momentum, temperature.")
    loader: LoaderConfig = Field(default_factory=LoaderConfig, description="Reading the tiler's shards.")
    expert_placement: ExpertPlacementConfig = Field(default_factory=ExpertPlacementConfig,
                                                    description="Where the expert teachers run.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="ZeRO stage and precision.")
    run: RunSettings = Field(default_factory=RunSettings, description="Scale, length, checkpoints, logging.")
