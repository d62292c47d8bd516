"""Expert distillation: cosine CLS term, cosine + SmoothL1 patch term, bicubic grid resampling, the expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpfm_scale.models.config import ExpertConfig, default_experts
from gpfm_scale.models.losses import (
    ExpertDistillLoss,
    ExpertTokens,
    expert_cls_loss,
    expert_patch_loss,
    resample_patch_grid,
)


def test_cls_loss_is_mean_one_minus_cosine() -> None:
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    target = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # cos 1, 0, -1
    assert expert_cls_loss(student, target).item() == pytest.approx((0 + 1 + 2) / 3)


def test_patch_loss_smooth_l1_part_on_aligned_tokens() -> None:
    student = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])  # cos 1 everywhere; one element differs by 1.5
    # SmoothL1(beta=1): |d| >= 1 -> |d| - 0.5 = 1.0; mean over the 4 elements = 0.25
    assert expert_patch_loss(student, target).item() == pytest.approx(0.1 * 0.25)


def test_patch_loss_combines_cosine_and_smooth_l1() -> None:
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # 1 - cos = 1, 0; diffs 1, -1, 0, 0 -> 0.5 each
    assert expert_patch_loss(student, target).item() == pytest.approx(0.9 * 0.5 + 0.1 * (0.5 + 0.5) / 4)


def test_resample_matches_interpolate_on_the_grid_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 3, 4, 4, generator=gen)  # [B, D, h, w]
    tokens = grid.flatten(2).transpose(1, 2)  # row-major tokens [B, 16, D]
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(resample_patch_grid(tokens, (6, 6)), expected)


def test_resample_keeps_row_major_order() -> None:
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    tokens = torch.stack([rows, cols], dim=-1).reshape(1, 64, 2)  # channel 0 = row, channel 1 = column
    out = resample_patch_grid(tokens, (4, 4))
    # output centres sit at input coordinates 0.5, 2.5, 4.5, 6.5; away from the border bicubic is exact on a ramp
    assert out[0, 1 * 4 + 2].tolist() == pytest.approx([2.5, 4.5], abs=1e-5)
    assert out[0, 2 * 4 + 1].tolist() == pytest.approx([4.5, 2.5], abs=1e-5)


def test_resample_identity_non_square_and_dtype() -> None:
    tokens = torch.randn(1, 9, 4)
    assert resample_patch_grid(tokens, (3, 3)) is tokens
    with pytest.raises(ValueError, match="square"):
        resample_patch_grid(torch.randn(1, 6, 4), (3, 3))
    grid = torch.randn(1, 4, 2, 3)
    out = resample_patch_grid(grid.flatten(2).transpose(1, 2), (4, 6), from_hw=(2, 3))
    expected = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    assert resample_patch_grid(tokens.bfloat16(), (6, 6)).dtype == torch.bfloat16


def _experts() -> ExpertDistillLoss:
    return ExpertDistillLoss(
        [
            ExpertConfig(name="uni", cls_weight=1.0, patch_weight=0.25),
            ExpertConfig(name="conch", cls_weight=1.0, patch_weight=None),
        ]
    )


def test_expert_loop_names_terms_and_resamples_targets() -> None:
    gen = torch.Generator().manual_seed(3)
    s_uni = ExpertTokens(torch.randn(2, 5, generator=gen), torch.randn(2, 4, 5, generator=gen))  # 2x2 grid
    t_uni = ExpertTokens(torch.randn(2, 5, generator=gen), torch.randn(2, 16, 5, generator=gen))  # 4x4 grid
    s_conch = ExpertTokens(torch.randn(2, 3, generator=gen))
    t_conch = ExpertTokens(torch.randn(2, 3, generator=gen))
    loss = _experts()
    conch_as_dict = {"cls": t_conch.cls, "patch": None}  # the experts' forward returns dicts
    terms = loss({"uni": s_uni, "conch": s_conch}, {"uni": t_uni, "conch": conch_as_dict})
    assert sorted(terms) == ["expert/conch/cls", "expert/uni/cls", "expert/uni/patch"]
    assert terms["expert/uni/cls"].item() == pytest.approx(expert_cls_loss(s_uni.cls, t_uni.cls).item())
    resampled = resample_patch_grid(t_uni.patch, (2, 2))
    assert terms["expert/uni/patch"].item() == pytest.approx(expert_patch_loss(s_uni.patch, resampled).item())
    assert loss.term_weights == {"expert/uni/cls": 1.0, "expert/uni/patch": 0.25, "expert/conch/cls": 1.0}


def test_expert_config_errors() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        ExpertDistillLoss([ExpertConfig(name="uni"), ExpertConfig(name="uni")])
    tokens = ExpertTokens(torch.randn(2, 3))
    with pytest.raises(ValueError, match="patch"):
        _experts()({"uni": tokens, "conch": tokens}, {"uni": tokens, "conch": tokens})


def test_recipe_expert_weights_become_term_weights() -> None:
    assert ExpertDistillLoss(default_experts()).term_weights == {
        "expert/uni/cls": 1.0,
        "expert/uni/patch": 0.25,
        "expert/phikon/cls": 0.5,
        "expert/phikon/patch": 0.125,
        "expert/conch/cls": 1.0,
    }
