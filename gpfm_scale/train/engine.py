"""DeepSpeed glue: the engine config, the student's fp32 master weights for the EMA, and per-module clipping.

Where the student's exact values live. Under bf16 DeepSpeed keeps bf16 copies in the module and the fp32 master
weights in the optimiser, partitioned across ranks under ZeRO-1/2/3; under ZeRO-3 even fp32 parameters are only
local slices (`param.ds_tensor`). `fp32_master` returns one whole fp32 parameter through DeepSpeed's public
accessor (`safe_get_full_fp32_param`: an all-reduce of the fragments under ZeRO-1/2, an all-gather under ZeRO-3),
so the EMA teacher (fp32 buffers, whole on every rank: see `models/meta_arch.py`) follows the values the
optimiser really holds. Cost per bf16 step: one fp32 collective per teacher tensor, ~1.3 GB in all for ViT-L,
about as much traffic as ZeRO-2's own bf16 reduce-scatter + all-gather; fp32 runs without ZeRO-3 read the
parameter itself and communicate nothing. bf16 with ZeRO stage 0 is refused: its optimiser (DeepSpeed's
FP16_Optimizer in bf16) exposes no fp32 master weights, and ZeRO-1 moves the same bytes as stage 0.

Gradient clipping is DINOv2's (dinov2 train/train.py:247-260, kept by GPFM): the backbone and the DINO (and iBOT)
head each clipped to `clip_grad` by its own norm, expert projection heads never clipped. DeepSpeed's
`gradient_clipping` (one global norm over everything) is therefore off, and `clip_grad_norms` runs between
`engine.backward` and `engine.step`, on each rank's share of the reduced gradients: squared norms summed locally,
one all-reduce of [num modules] floats, then each module's shares scaled in place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from gpfm_scale.config import StrictModel
from gpfm_scale.errors import ConfigError

log = logging.getLogger(__name__)

BF16_STAGE0 = ("zero_stage 0 with bf16: the fp32 EMA teacher needs the optimiser's fp32 master weights, which "
               "stage 0's bf16 optimiser does not expose; use zero_stage 1 (same traffic)")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient = max_norm / (norm + eps), at most 1


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO stage (1/2 keep full parameters per rank).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="bf16 on GPU, fp32 on CPU (bf16 is 8-10x slower on CPUs without bf16 units).")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload the optimizer state to CPU memory.")
    reduce_bucket_size: int = Field(default=50_000_000, ge=1, description="Elements per gradient reduce bucket.")
    communication_backend: Literal["auto", "nccl", "gloo"] = Field(default="auto", description="nccl on GPU.")

    @model_validator(mode="after")
    def _bf16_needs_zero(self) -> DeepSpeedConfig:
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError(BF16_STAGE0)
        return self


def resolve_precision(cfg: DeepSpeedConfig, on_gpu: bool) -> str:
    return ("bf16" if on_gpu else "fp32") if cfg.precision == "auto" else cfg.precision


def deepspeed_config(cfg: DeepSpeedConfig, micro_batch: int, on_gpu: bool) -> dict[str, Any]:
    """The JSON config DeepSpeed reads. The optimiser is built by us (param groups, schedules); DeepSpeed wraps it.
    No `gradient_clipping`: `clip_grad_norms` clips per module (module docstring)."""
    bf16 = resolve_precision(cfg, on_gpu) == "bf16"
    if bf16 and cfg.zero_stage == 0:
        raise ConfigError(f"deepspeed: {BF16_STAGE0}")
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "reduce_bucket_size": cfg.reduce_bucket_size}
    if cfg.offload_optimizer and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        out["bf16"] = {"enabled": True}
    return out


def build_deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DeepSpeedConfig,
                           micro_batch: int, on_gpu: bool) -> Any:
    """`model` and our optimiser wrapped by DeepSpeed (torch.distributed must be initialised); the engine's
    `.optimizer` is DeepSpeed's wrapper, whose param groups the schedules set."""
    import deepspeed

    config = deepspeed_config(cfg, micro_batch, on_gpu)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def is_partitioned(param: Tensor) -> bool:
    return hasattr(param, "ds_tensor")


def fp32_master(param: nn.Parameter) -> Tensor:
    """The exact fp32 value of a student parameter, whole, on its device.

    Collective under ZeRO with bf16 or ZeRO-3: every rank must call it for the same parameters in the same order
    (`SSLMetaArch.update_teacher` does). An fp32 parameter that is not partitioned is its own master (ZeRO-1/2
    copy the updated fp32 partitions back into it, bit for bit) and is returned without communication.
    """
    if param.dtype == torch.float32 and not is_partitioned(param):
        return param.detach()
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    if full is None:
        raise RuntimeError(f"no fp32 master weights for a {param.dtype} parameter of shape {tuple(param.shape)}: "
                           "is it outside the optimiser, or is this bf16 without ZeRO?")
    return full


def _local_grad(param: nn.Parameter) -> Tensor | None:
    """This rank's share of `param`'s reduced gradient: its ZeRO-3 partition, its fragment inside this rank's
    ZeRO-1/2 partition (None when the partition holds none of it), or the whole averaged `.grad` without ZeRO."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(param)
    if hasattr(param, "_hp_mapping"):  # what deepspeed.utils.safe_get_full_grad reads before its all-reduce
        mapping = param._hp_mapping
        return None if mapping is None else mapping.get_lp_grad_fragment(param._index_in_param_group)
    return param.grad


def _scale_local_grad(param: nn.Parameter, grad: Tensor, coef: Tensor) -> None:
    if hasattr(param, "ds_id"):  # a copy for bf16 partitions: write it back
        from deepspeed.utils import safe_set_local_grad

        safe_set_local_grad(param, grad * coef)
    else:  # the fragment is a view of the gradient the optimiser steps with
        grad.mul_(coef.to(grad.dtype))


@torch.no_grad()
def clip_grad_norms(modules: Mapping[str, Sequence[nn.Parameter]], max_norm: float,
                    partitioned: bool) -> dict[str, Tensor]:
    """Clip each module's gradients to `max_norm` by that module's own L2 norm; returns the norms before clipping.

    `modules`: {name: parameters}, e.g. `SSLMetaArch.clipped_modules()`. `partitioned`: whether each rank holds
    only a share of the gradients (any ZeRO stage); the squared norms are then summed over ranks (every rank
    must call). The coefficient is torch's `clip_grad_norm_`: min(1, max_norm / (norm + 1e-6)); `max_norm` 0
    only measures. Norms are fp32 scalars on the gradients' device (no host sync here).
    """
    shares = {name: [(p, g) for p in params if (g := _local_grad(p)) is not None] for name, params in modules.items()}
    device = next((g.device for pairs in shares.values() for _, g in pairs), torch.device("cpu"))
    squares = torch.zeros(len(shares), dtype=torch.float32, device=device)
    for i, pairs in enumerate(shares.values()):
        for _, g in pairs:
            squares[i] += torch.linalg.vector_norm(g, dtype=torch.float32) ** 2
    if partitioned and torch.distributed.is_initialized():
        torch.distributed.all_reduce(squares)
    norms = squares.sqrt()
    if max_norm > 0:
        coefs = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        for i, pairs in enumerate(shares.values()):
            for p, g in pairs:
                _scale_local_grad(p, g, coefs[i])
    return dict(zip(shares, norms.unbind()))
