"""iBOT masked-patch loss: the student predicts, at each masked position, the teacher's prototype distribution.

Only masked tokens enter. They are passed flattened: M = masks.sum() rows, ordered as
`tokens.flatten(0, 1)[masks.flatten()]` (image 0's masked patches in raster order, then image 1's, ...).
Each image i with n_i masked tokens is weighted 1 / n_i and the sum is divided by the number of images
(DINOv2 `forward_masked`):

    ibot = (1 / n_images) * sum_i (1 / n_i) * sum_{p masked in i} CE(student_p, teacher_p)

so every masked image counts equally whatever its mask ratio, and n_images counts ALL global crops in the
mask tensor, including unmasked ones (they add 0): with masks on half the crops the value is about half the
mean per-image CE, exactly as in DINOv2 (whose meta-arch scales it by 2 x 1/2 = 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpfm_scale.models.losses.centering import CenteredTeacherLoss, all_reduce_sum, sinkhorn_knopp
from gpfm_scale.models.losses.dino_cls import cross_entropy_terms


def masked_token_weights(masks: Tensor) -> Tensor:
    """Weight 1 / n_i of each masked token, [M] float32, in the flattened order used by the loss.

    masks: [n_images, N] bool. Images with no masked token contribute no rows.
    """
    masks = masks.bool()
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class IbotPatchLoss(CenteredTeacherLoss):
    """iBOT patch loss, with its own teacher center (`CenteredTeacherLoss`), separate from the DINO CLS one."""

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_logits: Tensor,
        teacher_temp: float,
        n_masked_patches: Tensor | None = None,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp probabilities for masked-token logits [M, K].

        n_masked_patches: this rank's number of masked tokens (scalar tensor; default M). It is summed over
        ranks, so the prototype balance is over every masked token of the global batch even when ranks hold
        different counts. Pass exactly the M real rows (no padding).
        """
        if n_masked_patches is None:
            n_masked_patches = torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device)
        num_samples = all_reduce_sum(n_masked_patches.detach().float().reshape(1).clone())
        return sinkhorn_knopp(teacher_logits, teacher_temp, num_samples, n_iterations)

    def forward(
        self,
        student_logits: Tensor,
        teacher_probs: Tensor,
        masks: Tensor,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Masked-token loss (scalar, see module docstring).

        student_logits, teacher_probs: [M, K] for the M masked tokens in flattened-mask order.
        masks: [n_images, N] bool, the student's mask for every global crop of this rank.
        masks_weight: [M] per-token weights if the collate already computed them (default 1 / n_i).
        """
        if masks_weight is None:
            masks_weight = masked_token_weights(masks)
        if teacher_probs.shape != student_logits.shape or masks_weight.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"expected [M, K] student logits and teacher probs with M = {masks_weight.shape[0]} masked "
                f"tokens, got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        ce = cross_entropy_terms(student_logits, teacher_probs, self.student_temp)
        return (ce * masks_weight.to(ce.dtype)).sum() / masks.shape[0]
