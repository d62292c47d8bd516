"""DinoClsLoss: cross-view pairing and normalisation, centring, center EMA, Sinkhorn-Knopp invariants.

Expected values come from naive per-image loops over Python floats, not from the vectorised code.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpfm_scale.models.losses import DinoClsLoss

STUDENT_TEMP = 0.1


def naive_ce(student_row: list[float], teacher_row: list[float], temp: float = STUDENT_TEMP) -> float:
    """-sum_k t_k log softmax(s / temp)_k for one image, written out."""
    scaled = [v / temp for v in student_row]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(v - top) for v in scaled))
    return -sum(t * (v - log_z) for t, v in zip(teacher_row, scaled))


def naive_pair(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """One pair term: CE averaged over the images of the pair."""
    rows = [naive_ce(s, t) for s, t in zip(student.tolist(), teacher.tolist())]
    return sum(rows) / len(rows)


def _inputs(batch: int, n_local: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    student_global = torch.randn(2 * batch, k, generator=gen)
    student_local = torch.randn(n_local * batch, k, generator=gen)
    teacher_probs = torch.softmax(torch.randn(2 * batch, k, generator=gen) * 3, dim=-1)
    return student_global, student_local, teacher_probs


def test_global_pairs_each_crop_with_the_other_teacher_crop() -> None:
    batch, n_local = 2, 3
    sg, sl, tp = _inputs(batch, n_local)
    terms = DinoClsLoss(out_dim=4)(sg, sl, tp)
    s_a, s_b, t_a, t_b = sg[:batch], sg[batch:], tp[:batch], tp[batch:]
    n_terms = 2 + 2 * n_local
    expected_global = (naive_pair(s_a, t_b) + naive_pair(s_b, t_a)) / n_terms
    same_view = (naive_pair(s_a, t_a) + naive_pair(s_b, t_b)) / n_terms
    assert terms["dino_global"].item() == pytest.approx(expected_global, rel=1e-5)
    assert abs(same_view - expected_global) > 1e-2  # the inputs tell the two pairings apart


def test_local_crops_match_both_teacher_globals() -> None:
    batch, n_local = 2, 3
    sg, sl, tp = _inputs(batch, n_local)
    terms = DinoClsLoss(out_dim=4)(sg, sl, tp)
    t_a, t_b = tp[:batch], tp[batch:]
    local_sum = sum(
        naive_pair(sl[i * batch : (i + 1) * batch], t_a) + naive_pair(sl[i * batch : (i + 1) * batch], t_b)
        for i in range(n_local)
    )
    assert terms["dino_local"].item() == pytest.approx(local_sum / (2 + 2 * n_local), rel=1e-5)


def test_without_local_crops_global_is_mean_of_the_two_pairs() -> None:
    sg, _, tp = _inputs(batch=3, n_local=0)
    terms = DinoClsLoss(out_dim=4)(sg, None, tp)
    expected = (naive_pair(sg[:3], tp[3:]) + naive_pair(sg[3:], tp[:3])) / 2
    assert terms["dino_global"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["dino_local"].item() == 0.0


def test_gradient_reaches_every_student_view() -> None:
    sg, sl, tp = _inputs(batch=2, n_local=2)
    sg.requires_grad_(True)
    sl.requires_grad_(True)
    terms = DinoClsLoss(out_dim=4)(sg, sl, tp)
    (terms["dino_global"] + terms["dino_local"]).backward()
    assert sg.grad.abs().sum(dim=1).min() > 0 and sl.grad.abs().sum(dim=1).min() > 0


def test_shape_errors_are_explicit() -> None:
    sg, sl, tp = _inputs(batch=2, n_local=2)
    loss = DinoClsLoss(out_dim=4)
    with pytest.raises(ValueError, match="2B, K"):
        loss(sg[:3], sl, tp[:3])
    with pytest.raises(ValueError, match="multiple of B"):
        loss(sg, sl[:3], tp)


def test_softmax_center_teacher_subtracts_center_and_sharpens() -> None:
    loss = DinoClsLoss(out_dim=3)
    loss.center.copy_(torch.tensor([[0.0, 1.0, 0.0]]))
    probs = loss.softmax_center_teacher(torch.tensor([[1.0, 2.0, 3.0]]), teacher_temp=0.5)
    shifted = [1.0 / 0.5, 1.0 / 0.5, 3.0 / 0.5]  # (z - c) / T
    z = sum(math.exp(v) for v in shifted)
    assert probs[0].tolist() == pytest.approx([math.exp(v) / z for v in shifted], rel=1e-6)


def test_center_ema_follows_formula() -> None:
    loss = DinoClsLoss(out_dim=2, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))  # batch mean [2, 4]
    assert loss.center[0].tolist() == pytest.approx([0.2, 0.4])  # 0.9 * 0 + 0.1 * [2, 4]
    loss.update_center(torch.tensor([[10.0, 0.0]]))
    assert loss.center[0].tolist() == pytest.approx([0.9 * 0.2 + 1.0, 0.9 * 0.4])
    assert "center" in dict(loss.named_buffers())


def naive_sinkhorn(logits: list[list[float]], temp: float, iters: int) -> list[list[float]]:
    """Sinkhorn-Knopp on a [B][K] list, alternating prototype (column) and sample (row) normalisation."""
    q = [[math.exp(v / temp) for v in row] for row in logits]
    b, k = len(q), len(q[0])
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        col = [sum(q[i][j] for i in range(b)) for j in range(k)]
        q = [[q[i][j] / col[j] / k for j in range(k)] for i in range(b)]
        q = [[v / sum(row) / b for v in row] for row in q]
    return [[v * b for v in row] for row in q]


def test_sinkhorn_matches_naive_loops_and_rows_sum_to_one() -> None:
    logits = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -0.5], [0.8, 0.7, 0.2], [-0.3, 0.0, 0.5]])
    q = DinoClsLoss(out_dim=3).sinkhorn_knopp_teacher(logits, teacher_temp=0.2, n_iterations=3)
    expected = naive_sinkhorn(logits.tolist(), 0.2, 3)
    assert q.tolist() == [pytest.approx(row, rel=1e-5) for row in expected]
    assert q.sum(dim=1).tolist() == pytest.approx([1.0] * 4, abs=1e-6)  # exact invariant: rows are distributions


def test_sinkhorn_columns_converge_to_b_over_k_and_survive_large_logits() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=gen) * 5  # exp(15 / 0.04) overflows without the max shift
    q = DinoClsLoss(out_dim=3).sinkhorn_knopp_teacher(logits, teacher_temp=0.04, n_iterations=500)
    assert torch.isfinite(q).all()
    assert q.sum(dim=1).tolist() == pytest.approx([1.0] * 6, abs=1e-5)
    assert q.sum(dim=0).tolist() == pytest.approx([6 / 3] * 3, abs=1e-3)  # B / K per prototype
