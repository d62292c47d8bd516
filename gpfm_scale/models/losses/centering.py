"""Teacher-side normalisation shared by the DINO (CLS) and iBOT (patch) losses.

Both losses turn teacher logits into target distributions in one of two ways:
- softmax centring: subtract an EMA "center" of past teacher logits, then a sharp softmax (temperature 0.04-0.07).
  The center keeps one prototype from dominating; the low temperature keeps the targets from going uniform.
- Sinkhorn-Knopp (SwAV/DINOv2): a few alternating normalisations that make the batch's soft assignment spread
  evenly over the prototypes. Used for bigger models; no state.

Every reduction over the batch goes through `all_reduce_sum`/`all_reduce_max`, which are no-ops unless
torch.distributed is initialised, so the same code is exact on one process and on many.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def distributed_ready() -> bool:
    """True when a process group exists, i.e. batch statistics must be reduced across ranks."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` in place over all ranks (identity on one process); returns `t` for chaining."""
    if distributed_ready():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    """Max of `t` in place over all ranks (identity on one process); returns `t`."""
    if distributed_ready():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _global_logsumexp_rows(x: Tensor) -> Tensor:
    """log sum_j exp(x[k, j]) over the local columns of every rank; x [K, M] -> [K, 1]. Exact and stable:
    each row is shifted by its global max before exp (all-reduced max, then all-reduced sum)."""
    if x.shape[1]:
        row_max = x.amax(dim=1, keepdim=True)
    else:
        row_max = x.new_full((x.shape[0], 1), float("-inf"))
    row_max = all_reduce_max(row_max.clone())
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    row_sum = all_reduce_sum(torch.exp(x - row_max).sum(dim=1, keepdim=True))
    return torch.log(row_sum) + row_max


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, num_samples: Tensor, num_iterations: int = 3) -> Tensor:
    """Soft assignment of samples to prototypes with equal prototype mass (DINOv2 `sinkhorn_knopp_teacher`).

    logits: [M, K] local rows (M may differ per rank, even be 0). num_samples: scalar tensor, the number of
    rows summed over all ranks (M_total). Returns Q [M, K] float32 where every row sums to 1 (the last step
    normalises the samples), and each prototype's column sum over all ranks tends to M_total / K as
    `num_iterations` grows (after 3 iterations it is close, not exact).

    Same iterations as DINOv2 (prototype normalisation to 1/K, then sample normalisation to 1/M_total),
    computed in log space: with a temperature of 0.04, exp(logit / temp) over- or underflows float32 for
    logits beyond ~3.5, which turns DINOv2's version into NaN; here it stays finite. DINOv2's initial division
    by the total mass is a scalar the first prototype normalisation removes, so it is skipped.
    """
    if num_iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least 1 iteration, got {num_iterations}")
    log_q = logits.float().t() / temp  # [K, M]: prototypes x samples, as in the SwAV paper
    log_k = math.log(log_q.shape[0])
    log_m = torch.log(num_samples.to(device=log_q.device, dtype=log_q.dtype).reshape(()))
    for _ in range(num_iterations):
        log_q = log_q - _global_logsumexp_rows(log_q) - log_k  # each prototype's mass over all ranks -> 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_m  # each sample's mass -> 1/M_total
    return torch.exp(log_q + log_m).t()


@torch.no_grad()
def ema_center(center: Tensor, logits: Tensor, momentum: float) -> Tensor:
    """New center [1, K]: momentum * center + (1 - momentum) * mean of the teacher logits [..., K].

    The mean is exact over every row of every rank (the row sums and the row count are both all-reduced);
    DINOv2's iBOT loss instead averages per-rank means, which differs when ranks hold different numbers of
    masked tokens. A batch with no rows anywhere leaves the center unchanged.
    """
    flat = logits.detach().float().reshape(-1, logits.shape[-1])
    stats = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])
    stats = all_reduce_sum(stats)
    count = stats[-1]
    if count == 0:
        return center
    batch_mean = (stats[:-1] / count).reshape_as(center).to(center.dtype)
    return center * momentum + batch_mean * (1.0 - momentum)


class CenteredTeacherLoss(nn.Module):
    """What the DINO (CLS) and iBOT (patch) losses keep for softmax centring: the teacher center [1, K], a buffer
    so that it is checkpointed with the model, its EMA momentum, and the student temperature. Each loss has its own
    center: CLS and masked-patch logits have different statistics.

    The center used at a step is the one from before that step's `update_center`, as in DINOv2.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """softmax((z - center) / teacher_temp) for teacher logits [N, K] (CLS rows or masked tokens); [N, K]
        float32."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """center <- m * center + (1 - m) * the mean teacher logit over every row of every rank (`ema_center`)."""
        self.center.copy_(ema_center(self.center, teacher_logits, self.center_momentum))
