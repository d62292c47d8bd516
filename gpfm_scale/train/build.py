"""The one way to build what `train_step` acts on: model, optimiser (param groups), schedules, engine.

Every trainer builds here, so that the Ray Train worker, the single-process trainer and the benchmarks' baselines
start from the same weights and step with the same rules:
- model: `SSLMetaArch` initialised after `torch.manual_seed(seed)` (identical on every rank), then the warm start
  (`init`) unless the run resumes from a checkpoint;
- optimiser: AdamW over the student's parameter groups (`param_groups.py`); lr and weight decay are set by the
  step from the schedules, so the constructor's lr is never used;
- schedules: peak lr scaled by the global batch (`batch_size x world`), lengths from `total_iters`;
- engine: DeepSpeed's (the worker) or `LocalEngine` (one process), both behind `step.Engine`.
The per-step seed is `step.step_seed` (seed, rank, step), drawn inside `train_step`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from gpfm_scale.data.config import CropConfig
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.engine import build_deepspeed_engine, resolve_precision
from gpfm_scale.train.param_groups import build_param_groups
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.schedules import build_schedules
from gpfm_scale.train.step import LocalEngine, Trainer
from gpfm_scale.train.warm_start import InitConfig, init_unless_resuming


def student_grid(objective_cfg: ObjectiveConfig, crop_cfg: CropConfig) -> tuple[int, int]:
    """(h, w) patches of a global crop for the student; the crop must be a whole number of patches."""
    patch = objective_cfg.model.backbone.patch_size
    if crop_cfg.global_size % patch:
        raise ConfigError(f"crop.global_size {crop_cfg.global_size} is not a multiple of the patch size {patch}")
    side = crop_cfg.global_size // patch
    return side, side


def build_model(objective_cfg: ObjectiveConfig, seed: int, init: InitConfig | None = None, *,
                resuming: bool = False, device: torch.device | None = None) -> SSLMetaArch:
    """The meta-arch from `seed` (same weights on every rank), on `device`, with `init`'s weights loaded unless
    resuming (the checkpoint holds them then)."""
    torch.manual_seed(seed)
    model = SSLMetaArch(objective_cfg)
    if device is not None:
        model = model.to(device)
    if init is not None:
        init_unless_resuming(model, init, resuming=resuming)
    return model.train()


def build_optimizer(model: SSLMetaArch, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups (lr and weight decay are set per step by `apply_schedule`)."""
    groups = build_param_groups(model.student, optim_cfg)
    return torch.optim.AdamW(groups, lr=0.0, betas=optim_cfg.betas, eps=optim_cfg.eps)


def build_local_trainer(model: SSLMetaArch, optim_cfg: OptimConfig, schedule_cfg: ScheduleConfig, *, seed: int,
                        total_batch: int, total_iters: int, autocast: torch.dtype | None = None) -> Trainer:
    """A single-process trainer of `model` (in place): fresh optimiser and schedules, `LocalEngine`."""
    engine = LocalEngine(model, build_optimizer(model, optim_cfg), autocast)
    schedules = build_schedules(schedule_cfg, total_batch=total_batch, total_iters=total_iters)
    return Trainer(engine, schedules, optim_cfg.clip_grad, seed)


def build_pretrain_trainer(cfg: PretrainConfig, device: torch.device, *, rank: int = 0, world: int = 1,
                           resuming: bool = False, use_deepspeed: bool = True) -> Trainer:
    """The trainer of one `pretrain` rank: DeepSpeed-wrapped (the Ray Train worker; torch.distributed must be
    up), or with `use_deepspeed=False` the same model, optimiser, schedules and seeds in one plain process (the
    benchmark's baseline; a bf16 run on a GPU is autocast over fp32 weights there, the plain-PyTorch way). The
    lr scales with the global batch, batch_size x world."""
    on_gpu = device.type == "cuda"
    model = build_model(cfg.objective, cfg.run.seed, cfg.init, resuming=resuming, device=device)
    bf16 = on_gpu and resolve_precision(cfg.deepspeed, on_gpu) == "bf16"
    local = build_local_trainer(model, cfg.optim, cfg.schedule, seed=cfg.run.seed,
                                total_batch=cfg.loader.batch_size * world, total_iters=cfg.run.total_iters,
                                autocast=torch.bfloat16 if bf16 else None)
    if not use_deepspeed:
        return replace(local, rank=rank)
    engine = build_deepspeed_engine(model, local.engine.optimizer, cfg.deepspeed, cfg.loader.batch_size, on_gpu)
    return replace(local, engine=engine, rank=rank)
