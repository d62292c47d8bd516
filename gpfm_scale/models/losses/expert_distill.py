"""Expert knowledge distillation: the student's projected tokens regress frozen experts' tokens (UNI, Phikon, CONCH).

Per expert e, with the student's tokens already mapped by e's projection head to e's width D_e:
- CLS term:   mean over the B rows of (1 - cos(student_cls, expert_cls)).
- patch term: 0.9 * mean over the B*N tokens of (1 - cos) + 0.1 * SmoothL1(beta=1) averaged over all B*N*D_e
  elements (torch's default 'mean' reduction), after the expert's patch grid is resampled bicubically to the
  student's grid (GPFM `FeatureLoss`). SmoothL1 compares raw values, so it also pulls the magnitudes together.
Experts without patch targets (CONCH: its target is a pooled, projected embedding) have patch weight None.

`ExpertDistillLoss` returns UNWEIGHTED terms named `expert/<name>/cls` and `expert/<name>/patch`; its
`term_weights` carry each expert's weights for `weighted_total`, so logs show the raw values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

PATCH_COS_WEIGHT = 0.9
PATCH_SMOOTH_L1_WEIGHT = 0.1


class ExpertTokens(NamedTuple):
    """Tokens of one expert (targets) or of the student projected for that expert.

    cls: [B, D]. patch: [B, N, D] or None (experts without patch targets).
    """

    cls: Tensor
    patch: Tensor | None = None


class ExpertWeights(Protocol):
    """What the loss reads of an expert's config: `gpfm_scale.models.config.ExpertConfig` satisfies it
    (recipe: UNI 1.0 / 0.25, Phikon 0.5 / 0.125, CONCH 1.0 / None)."""

    name: str
    cls_weight: float
    patch_weight: float | None


TokensLike = ExpertTokens | Mapping[str, Tensor | None]


def as_expert_tokens(tokens: TokensLike) -> ExpertTokens:
    """ExpertTokens from itself or from an expert's output dict {"cls": [B, D], "patch": [B, N, D] | None}."""
    if isinstance(tokens, ExpertTokens):
        return tokens
    cls = tokens["cls"]
    if cls is None:
        raise ValueError("expert tokens need a 'cls' tensor")
    return ExpertTokens(cls, tokens.get("patch"))


def _cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos along the last dim, float32; shape = a.shape[:-1]."""
    return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)


def expert_cls_loss(student_proj: Tensor, target: Tensor) -> Tensor:
    """mean(1 - cos) over rows of [B, D] inputs (scalar, float32)."""
    if student_proj.shape != target.shape:
        raise ValueError(f"student {tuple(student_proj.shape)} vs target {tuple(target.shape)}: shapes differ")
    return _cosine_distance(student_proj, target.detach()).mean()


def _square_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} patch tokens do not form a square grid; pass from_hw explicitly")
    return side


def resample_patch_grid(tokens: Tensor, to_hw: tuple[int, int], from_hw: tuple[int, int] | None = None) -> Tensor:
    """Resample a row-major patch grid [B, h_in*w_in, D] to [B, h*w, D] (bicubic, align_corners=False).

    The source grid is assumed square (h_in = w_in = sqrt(N)) unless `from_hw` gives it; a non-square N
    without `from_hw` raises ValueError rather than guessing a layout. Same size in and out returns the
    input unchanged. Interpolation runs in float32 (bicubic has no bf16 CPU kernel) and the result is cast
    back to the input dtype. Tokens must be patch tokens only (no CLS/register tokens).
    """
    batch, num_tokens, dim = tokens.shape
    h_in, w_in = from_hw if from_hw is not None else (_square_side(num_tokens),) * 2
    if h_in * w_in != num_tokens:
        raise ValueError(f"from_hw {from_hw} does not match {num_tokens} tokens")
    if (h_in, w_in) == tuple(to_hw):
        return tokens
    grid = tokens.float().transpose(1, 2).reshape(batch, dim, h_in, w_in)
    out = F.interpolate(grid, size=tuple(to_hw), mode="bicubic", align_corners=False)
    return out.flatten(2).transpose(1, 2).to(tokens.dtype)


def expert_patch_loss(
    student: Tensor,
    target: Tensor,
    cos_weight: float = PATCH_COS_WEIGHT,
    smooth_l1_weight: float = PATCH_SMOOTH_L1_WEIGHT,
) -> Tensor:
    """cos_weight * mean_{B,N}(1 - cos) + smooth_l1_weight * mean_{B,N,D} SmoothL1(beta=1); inputs [B, N, D]."""
    if student.shape != target.shape:
        raise ValueError(f"student {tuple(student.shape)} vs target {tuple(target.shape)}: resample first")
    target = target.detach().float()
    cosine = _cosine_distance(student, target).mean()
    smooth_l1 = F.smooth_l1_loss(student.float(), target, reduction="mean", beta=1.0)
    return cos_weight * cosine + smooth_l1_weight * smooth_l1


class ExpertDistillLoss(nn.Module):
    """Loops over the configured experts; one code path for all of them."""

    def __init__(self, experts: Sequence[ExpertWeights]) -> None:
        super().__init__()
        names = [e.name for e in experts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate expert names in {names}")
        self.experts = list(experts)

    @property
    def term_weights(self) -> dict[str, float]:
        """Weight of every term this loss returns, keyed like the terms (for `weighted_total`)."""
        weights: dict[str, float] = {}
        for e in self.experts:
            weights[f"expert/{e.name}/cls"] = e.cls_weight
            if e.patch_weight is not None:
                weights[f"expert/{e.name}/patch"] = e.patch_weight
        return weights

    def forward(self, student: Mapping[str, TokensLike], targets: Mapping[str, TokensLike]) -> dict[str, Tensor]:
        """Unweighted terms per expert. student[name]: projected student tokens (cls [B, D_e], patch
        [B, N, D_e]); targets[name]: the expert's tokens (patch on any square grid, resampled here to the
        student's grid when it differs). Either as ExpertTokens or as the experts' {"cls", "patch"} dicts."""
        terms: dict[str, Tensor] = {}
        for e in self.experts:
            s, t = as_expert_tokens(student[e.name]), as_expert_tokens(targets[e.name])
            terms[f"expert/{e.name}/cls"] = expert_cls_loss(s.cls, t.cls)
            if e.patch_weight is None:
                continue
            if s.patch is None or t.patch is None:
                raise ValueError(f"expert {e.name!r} has a patch weight but no student or target patch tokens")
            side = _square_side(s.patch.shape[1])
            target_patch = resample_patch_grid(t.patch, (side, side))
            terms[f"expert/{e.name}/patch"] = expert_patch_loss(s.patch, target_patch)
        return terms
