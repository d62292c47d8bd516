"""DeepSpeed glue: the engine config, and the two places where ZeRO-3's partitioned parameters need care.

ZeRO-3 partitions every parameter of the wrapped module, the frozen teacher included, each one flattened and split
into equal per-rank slices (`param.ds_tensor`). Teacher and student parameters that correspond have the same shape,
so their slices cover the same elements on every rank: the EMA update can run on the slices alone, with no gather
and no communication. Exporting the teacher is the one place that needs whole parameters (gathered on rank 0).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from gpfm_scale.config import StrictModel
from gpfm_scale.train.ema import update_ema

log = logging.getLogger(__name__)


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO stage (1/2 keep full parameters per rank).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="bf16 on GPU, fp32 on CPU (bf16 is 8-10x slower on CPUs without bf16 units).")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload the optimizer state to CPU memory.")
    reduce_bucket_size: int = Field(default=50_000_000, ge=1, description="Elements per gradient reduce bucket.")
    communication_backend: Literal["auto", "nccl", "gloo"] = Field(default="auto", description="nccl on GPU.")


def resolve_precision(cfg: DeepSpeedConfig, on_gpu: bool) -> str:
    return ("bf16" if on_gpu else "fp32") if cfg.precision == "auto" else cfg.precision


def deepspeed_config(cfg: DeepSpeedConfig, micro_batch: int, clip_grad: float, on_gpu: bool) -> dict[str, Any]:
    """The JSON config DeepSpeed reads. The optimiser is built by us (param groups, schedules); DeepSpeed wraps it."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "reduce_bucket_size": cfg.reduce_bucket_size}
    if cfg.offload_optimizer and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip_grad,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if resolve_precision(cfg, on_gpu) == "bf16":
        out["bf16"] = {"enabled": True}
    return out


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor")


def ema_update(pairs: Iterable[tuple[nn.Parameter, nn.Parameter]], momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, on ZeRO-3 slices when parameters are partitioned."""
    teachers, students = [], []
    for t, s in pairs:
        if is_partitioned(t) != is_partitioned(s):
            raise RuntimeError("teacher and student parameters must both be partitioned or both whole")
        if is_partitioned(t):
            if t.ds_tensor.shape != s.ds_tensor.shape:
                raise RuntimeError(f"ZeRO-3 slices differ: {tuple(t.ds_tensor.shape)} vs {tuple(s.ds_tensor.shape)}")
            teachers.append(t.ds_tensor)
            students.append(s.ds_tensor)
        else:
            teachers.append(t.data)
            students.append(s.data)
    update_ema(teachers, students, momentum)


def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Context: whole parameters inside (ZeRO-3 all-gather, read-only), a no-op otherwise."""
    if any(is_partitioned(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()
