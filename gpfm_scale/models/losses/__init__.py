"""GPFM pretraining losses, one per file (DINOv2 layout): each an nn.Module or function with its own state.

- `DinoClsLoss` (dino_cls.py): CLS self-distillation with the explicit A<->B / local->{A,B} pairing.
- `IbotPatchLoss` (ibot_patch.py): masked-patch self-distillation, each image weighted 1 / its masked count.
- `KoLeoLoss` (koleo.py): spreading regulariser with an epsilon guard that counts near-duplicates.
- `ExpertDistillLoss` (expert_distill.py): cosine / cosine + SmoothL1 regression onto frozen experts.
- `LossWeights`, `weighted_total` (total.py): which terms enter the total, with what weight.
"""

from gpfm_scale.models.losses.dino_cls import DinoClsLoss
from gpfm_scale.models.losses.expert_distill import (
    ExpertDistillLoss,
    ExpertTokens,
    ExpertWeights,
    as_expert_tokens,
    expert_cls_loss,
    expert_patch_loss,
    resample_patch_grid,
)
from gpfm_scale.models.losses.ibot_patch import IbotPatchLoss, masked_token_weights
from gpfm_scale.models.losses.koleo import KoLeoLoss
from gpfm_scale.models.losses.total import LossWeights, weighted_total

__all__ = [
    "DinoClsLoss",
    "ExpertDistillLoss",
    "ExpertTokens",
    "ExpertWeights",
    "IbotPatchLoss",
    "KoLeoLoss",
    "LossWeights",
    "as_expert_tokens",
    "expert_cls_loss",
    "expert_patch_loss",
    "masked_token_weights",
    "resample_patch_grid",
    "weighted_total",
]
