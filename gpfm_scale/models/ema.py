"""EMA teacher update: teacher <- m * teacher + (1 - m) * student, tensor by tensor, in the teacher's fp32.

The one EMA of the project (`SSLMetaArch.update_teacher` calls it; single process and DeepSpeed alike). A function
of tensors (not modules) so that the caller chooses where the student's exact fp32 values come from: the
parameters themselves in fp32 single-process training, or DeepSpeed's fp32 master weights when the module holds
bf16 copies or ZeRO-3 shards (`gpfm_scale.train.engine.fp32_master`). The student side may be a generator:
each whole fp32 student tensor is then materialised only while its teacher tensor is updated (a ViT-L step never
holds a second full fp32 copy of the model).

Why fp32: with momentum 0.992 -> 1 the per-step change (1 - m)(s - t) is near or below half a bf16 ulp
(2^-9 relative), so a bf16 teacher rounds most updates away (REFERENCE.md, fidelity audit item 1). The update
is DINOv2's `update_teacher` arithmetic (`mul_(m)` then `add_(s, alpha=1 - m)`), one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized

import torch
from torch import Tensor


@torch.no_grad()
def update_ema(teacher_params: Sequence[Tensor], student_params: Iterable[Tensor], momentum: float) -> None:
    """In place: teacher_i = momentum * teacher_i + (1 - momentum) * student_i for every pair.

    Teacher tensors must be float32 (the point of this module); student tensors are added in fp32. Pairs must
    have equal shapes and counts (checked, before any update when `student_params` has a length: a mismatch
    means the two models were built differently, which would silently corrupt the teacher).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    teacher = list(teacher_params)
    if isinstance(student_params, Sized) and len(student_params) != len(teacher):
        raise ValueError(f"{len(teacher)} teacher tensors vs {len(student_params)} student tensors")
    for i, t in enumerate(teacher):
        if t.dtype != torch.float32:
            raise ValueError(f"tensor {i}: the EMA teacher must be float32, got {t.dtype}")
    count = 0
    for t, s in zip(teacher, student_params):
        if t.shape != s.shape:
            raise ValueError(f"tensor {count}: teacher shape {tuple(t.shape)} vs student {tuple(s.shape)}")
        t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
        count += 1
    if count != len(teacher):
        raise ValueError(f"{len(teacher)} teacher tensors vs {count} student tensors")
