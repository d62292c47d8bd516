"""Every setting of `gpfm-scale pretrain`, composed from the configs of its parts (each default written once).

Each value has one owner, handed down to the parts that need it: `run.seed` seeds the model and the loader
(`loader_config()`), `schedule.iters_per_epoch` is both the schedules' epoch and the loader's data epoch. Values two
parts must agree on are checked here, naming both keys (`crops.global_size` is the size the backbone's position
embedding is made for, `objective.model.backbone.img_size`).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Mapping

from pydantic import Field, field_validator, model_validator

from gpfm_scale.config import StrictModel
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader_config import LoaderConfig, LoaderSettings
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.engine import DeepSpeedConfig
from gpfm_scale.train.expert_config import ExpertPlacementConfig
from gpfm_scale.train.warm_start import InitConfig


class RunSettings(StrictModel):
    """How long, how wide, how often: what scales with the cluster rather than the recipe."""

    num_workers: int = Field(default=16, ge=1, description="Ray Train workers (one GPU each when use_gpu).")
    global_batch_size: int | None = Field(
        default=None, ge=1, description="Images per optimiser step over all workers, when the run declares one "
        "(GPFM: 1,536); must equal loader.batch_size x run.num_workers (checked at load). The lr scales with it.")
    use_gpu: Literal["auto", "yes", "no"] = Field(
        default="auto", description="yes: wait for num_workers GPUs (resources_timeout_s), never train on CPU; "
        "auto: GPU if the cluster has one when the run starts, else CPU (with a warning); no: CPU.")
    cpus_per_worker: float = Field(default=8.0, gt=0, description="CPU slots per worker (data loading runs there).")
    total_iters: int = Field(default=500_000, ge=1, description="Optimiser steps of the whole run (GPFM: 500k).")
    stop_after_steps: int | None = Field(
        default=None, ge=1, description="Checkpoint and stop at this step without finishing (time-boxed or "
        "preemptible jobs); schedules still follow total_iters, and --resume continues.")
    checkpoint_every: int = Field(default=2_500, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(default=3, ge=1, description="Checkpoints kept (the newest ones).")
    log_every: int = Field(default=10, ge=1, description="Steps between metric reports (metrics.jsonl, Prometheus).")
    max_failures: int = Field(default=3, ge=0, description="Worker-group restarts from the last checkpoint.")
    seed: int = Field(default=0, ge=0, description="Seeds model init, drop-path, and the loader: shard draws, "
                      "shuffling, augmentation and masks (the run's one seed).")
    name: str = Field(default="pretrain", pattern=r"^[A-Za-z0-9_.-]+$", description="Ray Train run name.")
    ray_address: str | None = Field(default=None, description="Ray cluster; default RAY_ADDRESS, else local.")
    resources_timeout_s: float = Field(
        default=1800.0, gt=0, description="Wait this long for the workers' CPUs/GPUs (an autoscaling cluster "
        "starts GPU nodes in 5-15 min), then fail (exit 2).")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _yaml_bool(cls, v: object) -> object:
        """YAML reads a bare `yes` / `no` as a bool: take it as the word it was."""
        return {True: "yes", False: "no"}.get(v, v) if isinstance(v, bool) else v


class PretrainConfig(StrictModel):
    moved_keys: ClassVar[Mapping[str, str]] = {"loader.seed": "run.seed",
                                                "loader.epoch_length": "schedule.iters_per_epoch"}

    init: InitConfig = Field(default_factory=InitConfig, description="Warm start (GPFM's phase 2 starts from "
                             "phase 1's weights); loaded at step 0, never at resume.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="Models and losses.")
    crops: CropConfig = Field(default_factory=CropConfig, description="Multi-crop augmentation.")
    masks: MaskConfig = Field(default_factory=MaskConfig, description="iBOT masking.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="AdamW and its parameter groups.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="lr, wd, momentum, temperature.")
    loader: LoaderSettings = Field(default_factory=LoaderSettings, description="Reading the tiler's shards.")
    expert_placement: ExpertPlacementConfig = Field(default_factory=ExpertPlacementConfig,
                                                    description="Where the expert teachers run.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="ZeRO stage and precision.")
    run: RunSettings = Field(default_factory=RunSettings, description="Scale, length, checkpoints, logging.")

    @model_validator(mode="after")
    def _declared_global_batch(self) -> PretrainConfig:
        """A declared global batch must be what the layout gives: the lr (sqrt scaling) follows the real one."""
        declared = self.run.global_batch_size
        actual = self.loader.batch_size * self.run.num_workers
        if declared is not None and declared != actual:
            raise ValueError(
                f"run.global_batch_size {declared} != loader.batch_size {self.loader.batch_size} x run.num_workers "
                f"{self.run.num_workers} = {actual}; change one of them, or set run.global_batch_size to null"
            )
        return self

    @model_validator(mode="after")
    def _backbone_sized_for_global_crops(self) -> PretrainConfig:
        """The position embedding is made for the global crops: another size would be resampled every step and
        the export would state an input size the model was not trained at."""
        img_size, global_size = self.objective.model.backbone.img_size, self.crops.global_size
        if img_size != global_size:
            raise ValueError(f"objective.model.backbone.img_size {img_size} != crops.global_size {global_size}: the "
                             "backbone is made for the global crops; set both to the same size")
        return self

    def loader_config(self) -> LoaderConfig:
        """The loader's settings with the run's seed and epoch length handed down (what `build_loader` reads)."""
        return self.loader.bind(seed=self.run.seed, epoch_length=self.schedule.iters_per_epoch)
