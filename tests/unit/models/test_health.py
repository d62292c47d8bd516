"""Health signals on inputs whose values are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from gpfm_scale.models.health import effective_rank, expert_cosine, kl_teacher_student, teacher_entropy


def test_teacher_entropy_bounds() -> None:
    assert teacher_entropy(torch.full((3, 4), 0.25)) == pytest.approx(math.log(4))
    assert teacher_entropy(torch.eye(4)) == pytest.approx(0.0)
    assert teacher_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx(math.log(2) / 2)


def test_kl_teacher_student() -> None:
    p = torch.tensor([[0.5, 0.5]])
    student = torch.log(torch.tensor([[0.25, 0.75]])) * 0.1  # softmax(student / 0.1) = [0.25, 0.75]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_teacher_student(p, student, student_temp=0.1) == pytest.approx(expected, rel=1e-5)
    assert kl_teacher_student(p, torch.zeros(1, 2)) == pytest.approx(0.0, abs=1e-7)


def test_expert_cosine() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert expert_cosine(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2, rel=1e-6)


def test_effective_rank() -> None:
    assert effective_rank(torch.eye(6) * 3) == pytest.approx(6.0)
    rank_one = torch.outer(torch.arange(1.0, 9.0), torch.tensor([1.0, -2.0, 0.5]))
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
