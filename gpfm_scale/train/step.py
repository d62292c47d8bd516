"""One training step of the GPFM objective, written once for every trainer (torchtitan's `train_step`).

The Ray Train worker, the single-process trainer (`local.py`) and both benchmarks call `train_step`; they differ
only in the engine they hand it: DeepSpeed's (ZeRO partitions, bf16 casting) or `LocalEngine`, a plain-PyTorch
stand-in with the same four calls (`engine(batch, ...)`, `backward`, `step`, `zero_optimization_stage`). Per step:

  seed torch from (seed, rank, step) (drop-path: a function of the step, so a resumed run draws what it would
  have) -> lr / wd / last-layer lr onto the optimiser groups -> forward the meta-arch (teacher temperature from
  the schedule) -> backward -> clip the backbone and the DINO (and iBOT) head each by its own norm
  (`clip_grad_norms`, `OptimConfig.clip_grad`) -> optimiser step -> EMA of the teacher from the student's fp32
  master weights (`SSLMetaArch.update_teacher` with `fp32_master`: the parameter itself when it is fp32 and
  whole, DeepSpeed's master copy otherwise).

Nothing is read back to the host here: `StepResult` keeps tensors, and `logs()` syncs once, when a caller reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from gpfm_scale.models.meta_arch import ExpertTargets, SSLMetaArch
from gpfm_scale.train.engine import clip_grad_norms, fp32_master
from gpfm_scale.train.param_groups import apply_schedule
from gpfm_scale.train.schedules import Schedules, ScheduleValues

Timer = Callable[[str], AbstractContextManager[Any]]


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's step: randomness never depends on how the run got there (exact resume)."""
    return (seed * 1_000_003 + rank * 10_007 + step) % 2**63


class Engine(Protocol):
    """What `train_step` needs of an engine: DeepSpeed's `DeepSpeedEngine` interface, the part we use."""

    module: Any  # the SSLMetaArch
    optimizer: Any  # the optimiser whose param groups carry lr_multiplier / wd_multiplier / is_last_layer

    def __call__(self, batch: Mapping[str, Any], expert_targets: ExpertTargets | None, *,
                 teacher_temp: float) -> dict[str, Any]: ...

    def backward(self, loss: Tensor) -> Any: ...

    def step(self) -> Any: ...

    def zero_optimization_stage(self) -> int: ...


class LocalEngine:
    """A plain-PyTorch engine: one process, whole parameters, `torch.optim` stepping them directly.

    `autocast`: run the forward under torch.autocast in this dtype over fp32 parameters (the plain-PyTorch way to
    train in bf16 on a GPU, the benchmarks' baseline); None computes in the parameters' dtype.
    """

    def __init__(self, model: SSLMetaArch, optimizer: Optimizer, autocast: torch.dtype | None = None) -> None:
        self.module, self.optimizer, self.autocast = model, optimizer, autocast

    def __call__(self, batch: Mapping[str, Any], expert_targets: ExpertTargets | None, *,
                 teacher_temp: float) -> dict[str, Any]:
        with self.autocast_context():
            return self.module(batch, expert_targets, teacher_temp=teacher_temp)

    def autocast_context(self) -> AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.module.parameters()).device.type, dtype=self.autocast)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """Step, then drop the gradients (as DeepSpeed's step does), so the next backward starts from none."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_optimization_stage(self) -> int:
        return 0


@dataclass(frozen=True)
class Trainer:
    """Everything a step acts on, built once per run (`build.py`); the step number comes with each call."""

    engine: Engine
    schedules: Schedules
    clip_grad: float  # OptimConfig.clip_grad: per-module max norm, 0 only measures
    seed: int  # the run's seed; each step seeds torch from (seed, rank, step)
    rank: int = 0

    @property
    def model(self) -> SSLMetaArch:
        return self.engine.module


@dataclass(frozen=True)
class StepResult:
    """What one step computed. terms: loss terms and "total" (0-d tensors) plus `health/*` floats, as the
    meta-arch returns them; grad_norms: each clipped module's gradient norm before clipping (0-d fp32 tensors);
    schedule: the values the step ran with; clip_grad: the max norm it clipped to."""

    step: int
    terms: dict[str, Any]
    grad_norms: dict[str, Tensor]
    schedule: ScheduleValues
    clip_grad: float

    def logs(self) -> dict[str, float]:
        """Every figure as a float (one host sync): terms, `grad_norm/<module>`, lr, wd, momentum, teacher_temp."""
        out = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in self.terms.items()}
        out.update({f"grad_norm/{name}": float(norm) for name, norm in self.grad_norms.items()})
        s = self.schedule
        out.update(lr=s.lr, wd=s.wd, momentum=s.momentum, teacher_temp=s.teacher_temp)
        return out


def _untimed(_part: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def train_step(trainer: Trainer, batch: Mapping[str, Any], targets: ExpertTargets | None, step: int,
               timer: Timer | None = None) -> StepResult:
    """One optimiser step (0-based `step`) on `batch` (collated, on the model's device) with the experts'
    `targets` for it (None without experts). `timer(part)`, when given, wraps "forward", "backward", "optimizer"
    (clipping + step) and "ema", so that the objective benchmark times this step rather than a copy of it."""
    part = timer or _untimed
    engine, model = trainer.engine, trainer.model
    torch.manual_seed(step_seed(trainer.seed, trainer.rank, step))
    values = trainer.schedules.at(step)
    apply_schedule(engine.optimizer, values)
    with part("forward"):
        terms = engine(batch, targets, teacher_temp=values.teacher_temp)
    with part("backward"):
        engine.backward(terms["total"])
    with part("optimizer"):
        norms = clip_grad_norms(model.clipped_modules(), trainer.clip_grad, engine.zero_optimization_stage() > 0)
        engine.step()
    with part("ema"):
        model.update_teacher(values.momentum, fp32_master)
    return StepResult(step, terms, norms, values, trainer.clip_grad)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (non-blocking from pinned memory); other entries as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
