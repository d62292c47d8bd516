"""EMA teacher update: teacher <- m * teacher + (1 - m) * student, over plain lists of tensors.

A function of parameter lists (not modules) so the same update runs on full parameters (single process,
ZeRO-1/2: every rank holds them all) and on ZeRO-3 partitions (pass each rank's local shards, which line up
one-to-one because student and teacher are partitioned identically). Uses the fused `_foreach` kernels, as
DINOv2's `update_teacher` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def update_ema(teacher_params: Sequence[Tensor], student_params: Sequence[Tensor], momentum: float) -> None:
    """In place: teacher_i = momentum * teacher_i + (1 - momentum) * student_i for every pair.

    Lists must pair the same tensors in the same order with equal shapes (checked: a mismatch means the two
    models were built differently, which would silently corrupt the teacher).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    teacher, student = list(teacher_params), list(student_params)
    if len(teacher) != len(student):
        raise ValueError(f"{len(teacher)} teacher tensors vs {len(student)} student tensors")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"tensor {i}: teacher shape {tuple(t.shape)} vs student {tuple(s.shape)}")
    if not teacher:
        return
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
