"""Collapse and health signals for logging, each a small function returning a Python float.

What they catch: teacher entropy near 0 = the teacher's targets are one-hot on a few prototypes (sharpening
collapse); near log K = uniform targets (centring collapse). KL(teacher || student) near 0 while the entropy
is high = student and teacher agree on nothing informative. Expert cosine = how well the student tracks each
expert. Effective rank (Roy & Vetterli 2007) of a batch of CLS embeddings falling towards 1 = dimensional
collapse. All run without gradients on a local batch (no all-reduce): log per rank or average the floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def teacher_entropy(teacher_probs: Tensor) -> float:
    """Mean over rows of -sum_k p log p (nats) for probabilities [N, K]; in [0, log K]."""
    p = teacher_probs.float()
    return float(-torch.special.xlogy(p, p).sum(dim=-1).mean())


@torch.no_grad()
def kl_teacher_student(teacher_probs: Tensor, student_logits: Tensor, student_temp: float = 0.1) -> float:
    """Mean over rows of KL(teacher || softmax(student / student_temp)) in nats; [N, K] rows matched 1:1.

    The caller chooses the pairing: pass the global crops' student logits with the teacher probs of the
    same crops for a same-view agreement signal (or the swapped order for the one DINO optimises).
    """
    p = teacher_probs.float()
    log_q = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return float((torch.special.xlogy(p, p) - p * log_q).sum(dim=-1).mean())


@torch.no_grad()
def expert_cosine(student: Tensor, target: Tensor) -> float:
    """Mean cosine similarity along the last dim between equal-shape [..., D] tensors."""
    return float(F.cosine_similarity(student.float(), target.float(), dim=-1).mean())


@torch.no_grad()
def effective_rank(embeddings: Tensor, eps: float = 1e-12) -> float:
    """exp(entropy of the normalised singular values) of embeddings [N, D] (no centring); in [1, min(N, D)],
    0.0 for an all-zero matrix.

    p_i = s_i / sum_j s_j; erank = exp(-sum_i p_i log p_i). An identity-like matrix gives its dimension,
    a rank-1 matrix gives 1. Computed in float64 so tiny singular values do not add noise.
    """
    singular = torch.linalg.svdvals(embeddings.detach().double())
    total = singular.sum()
    if total <= eps:
        return 0.0
    p = singular / total
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))
