"""IbotPatchLoss: per-image 1 / n_masked weighting, centring and Sinkhorn on masked tokens."""

from __future__ import annotations

import math

import pytest
import torch

from gpfm_scale.models.losses import IbotPatchLoss, masked_token_weights
from gpfm_scale.models.losses.dino_cls import DinoClsLoss

# 3 global crops of 4 patches: image 0 has 3 masked tokens, image 1 has 1, image 2 none.
MASKS = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def naive_ce(student_row: list[float], teacher_row: list[float], temp: float = 0.1) -> float:
    scaled = [v / temp for v in student_row]
    log_z = math.log(sum(math.exp(v) for v in scaled))
    return -sum(t * (v - log_z) for t, v in zip(teacher_row, scaled))


def test_mask_weights_are_one_over_masked_count_in_flattened_order() -> None:
    assert masked_token_weights(MASKS).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])


def test_loss_weights_each_image_by_its_masked_count_and_divides_by_all_images() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=gen)
    teacher = torch.softmax(torch.randn(4, 5, generator=gen) * 2, dim=-1)
    value = IbotPatchLoss(out_dim=5)(student, teacher, MASKS).item()
    ce = [naive_ce(s, t) for s, t in zip(student.tolist(), teacher.tolist())]
    image0 = sum(ce[:3]) / 3  # tokens 0-2 belong to image 0 (raster order)
    image1 = ce[3]
    assert value == pytest.approx((image0 + image1 + 0.0) / 3, rel=1e-5)
    unweighted = sum(ce) / 4
    assert abs(value - unweighted) > 1e-3  # the weighting matters for these inputs


def test_precomputed_mask_weights_are_used_and_length_checked() -> None:
    student, teacher = torch.zeros(4, 2), torch.full((4, 2), 0.5)  # CE = log 2 per token
    value = IbotPatchLoss(out_dim=2)(student, teacher, MASKS, masks_weight=torch.ones(4))
    assert value.item() == pytest.approx(4 * math.log(2) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="masked"):
        IbotPatchLoss(out_dim=2)(student[:3], teacher[:3], MASKS)


def test_center_is_mean_over_masked_tokens() -> None:
    loss = IbotPatchLoss(out_dim=2, center_momentum=0.5)
    loss.update_center(torch.tensor([[2.0, 0.0], [4.0, 2.0], [0.0, 4.0]]))  # mean [2, 2]
    assert loss.center[0].tolist() == pytest.approx([1.0, 1.0])
    probs = loss.softmax_center_teacher(torch.tensor([[1.0, 1.0 + math.log(3) * 0.1]]), teacher_temp=0.1)
    assert probs[0].tolist() == pytest.approx([0.25, 0.75], rel=1e-5)


def test_sinkhorn_uses_the_masked_count_and_matches_the_cls_version() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, generator=gen)
    ibot = IbotPatchLoss(out_dim=3).sinkhorn_knopp_teacher(logits, 0.1, n_masked_patches=torch.tensor(5))
    dino = DinoClsLoss(out_dim=3).sinkhorn_knopp_teacher(logits, 0.1)
    torch.testing.assert_close(ibot, dino)
    assert ibot.sum(dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    default = IbotPatchLoss(out_dim=3).sinkhorn_knopp_teacher(logits, 0.1)
    torch.testing.assert_close(default, ibot)
