"""DINO self-distillation on the CLS token, with the multi-crop cross-view pairing made explicit.

Views: 2 global crops (A, B) seen by teacher and student, n_local local crops seen only by the student.
Each (student view s, teacher view t) pair with s != t contributes one cross-entropy term

    CE(s, t) = mean over the B images of  -sum_k  p_t[k] * log softmax(z_s / student_temp)[k]

where p_t are the teacher's centred (or Sinkhorn) probabilities. The pairs are:
- global: (student A, teacher B) and (student B, teacher A) -- never a view with itself: 2 terms;
- local:  (student local l, teacher A) and (student local l, teacher B) for every l: 2 * n_local terms.

Normalisation follows DINOv2 (`ssl_meta_arch.py`): both parts are divided by the total number of terms
n_terms = 2 + 2 * n_local, so `dino_global + dino_local` is the plain average of all pair terms:

    dino_global = (CE(sA, tB) + CE(sB, tA)) / n_terms
    dino_local  = sum_l (CE(s_l, tA) + CE(s_l, tB)) / n_terms

One deviation: DINOv2 counts max(2 * n_local, 1) local terms, so with no local crops it divides the global
part by 3; here it is divided by 2 (the average of the two global terms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gpfm_scale.models.losses.centering import CenteredTeacherLoss, all_reduce_sum, sinkhorn_knopp

NUM_GLOBAL_CROPS = 2


def cross_entropy_terms(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Per-row cross-entropy -sum_k t * log softmax(s / T) for [N, K] inputs; returns [N] (float32)."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


class DinoClsLoss(CenteredTeacherLoss):
    """DINO CLS loss: the cross-view pairing, on the teacher center it inherits (`CenteredTeacherLoss`).

    Typical step (centring): probs = loss.softmax_center_teacher(t_logits, temp); loss.update_center(t_logits);
    terms = loss(student_global, student_local, probs). The center used at a step is the one from before
    that step's update, as in DINOv2.
    """

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp teacher probabilities for logits [N, K] (rows over all ranks are balanced)."""
        num_samples = all_reduce_sum(torch.tensor([float(teacher_logits.shape[0])], device=teacher_logits.device))
        return sinkhorn_knopp(teacher_logits, teacher_temp, num_samples, n_iterations)

    def forward(self, student_global: Tensor, student_local: Tensor | None, teacher_probs: Tensor) -> dict[str, Tensor]:
        """Cross-view DINO terms; see the module docstring for the pairing and the normalisation.

        student_global: [2B, K] logits, crop A rows then crop B rows.
        student_local: [n_local * B, K] logits, local crop 0 rows, then crop 1, ... (or None / 0 rows).
        teacher_probs: [2B, K] teacher probabilities in the SAME order as student_global (A rows then B);
            the swap that pairs A with B happens here, so callers never reorder.
        Returns {"dino_global": scalar, "dino_local": scalar} (dino_local is 0 when there are no local crops).
        """
        if student_global.shape != teacher_probs.shape or student_global.shape[0] % NUM_GLOBAL_CROPS:
            raise ValueError(
                f"student_global {tuple(student_global.shape)} and teacher_probs {tuple(teacher_probs.shape)} "
                "must both be [2B, K]"
            )
        teacher_a, teacher_b = teacher_probs.chunk(NUM_GLOBAL_CROPS)
        student_a, student_b = student_global.chunk(NUM_GLOBAL_CROPS)
        n_local = self._num_local_crops(student_local, teacher_a.shape[0])
        n_terms = NUM_GLOBAL_CROPS + NUM_GLOBAL_CROPS * n_local
        global_sum = self._ce(student_a, teacher_b) + self._ce(student_b, teacher_a)
        local_sum = student_global.new_zeros((), dtype=torch.float32)
        if student_local is not None and n_local:
            for local in student_local.chunk(n_local):
                local_sum = local_sum + self._ce(local, teacher_a) + self._ce(local, teacher_b)
        return {"dino_global": global_sum / n_terms, "dino_local": local_sum / n_terms}

    def _ce(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """One pair term: cross-entropy averaged over the B images of the pair."""
        return cross_entropy_terms(student_logits, teacher_probs, self.student_temp).mean()

    @staticmethod
    def _num_local_crops(student_local: Tensor | None, batch: int) -> int:
        if student_local is None or student_local.shape[0] == 0:
            return 0
        if student_local.shape[0] % batch:
            raise ValueError(f"student_local has {student_local.shape[0]} rows, not a multiple of B={batch}")
        return student_local.shape[0] // batch
