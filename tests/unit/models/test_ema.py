"""update_ema against teacher = m * teacher + (1 - m) * student."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpfm_scale.models.ema import update_ema


def test_formula_on_plain_tensors() -> None:
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    student = [torch.tensor([3.0, 4.0]), torch.tensor([[0.0]])]
    update_ema(teacher, student, momentum=0.9)
    assert teacher[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4])
    assert teacher[1].item() == pytest.approx(9.0)
    assert student[0].tolist() == [3.0, 4.0]


def test_module_parameters_without_autograd_history() -> None:
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    for p in teacher.parameters():
        p.requires_grad_(False)
    expected = [0.25 * t + 0.75 * s for t, s in zip(teacher.parameters(), student.parameters())]
    update_ema(list(teacher.parameters()), list(student.parameters()), momentum=0.25)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got, want.detach())
        assert got.grad_fn is None
    frozen = [p.clone() for p in teacher.parameters()]
    update_ema(list(teacher.parameters()), list(student.parameters()), momentum=1.0)
    for got, want in zip(teacher.parameters(), frozen):
        torch.testing.assert_close(got, want)


def test_mismatches_raise() -> None:
    with pytest.raises(ValueError, match="teacher tensors"):
        update_ema([torch.zeros(2)], [], momentum=0.5)
    with pytest.raises(ValueError, match="shape"):
        update_ema([torch.zeros(2)], [torch.zeros(3)], momentum=0.5)
    with pytest.raises(ValueError, match="momentum"):
        update_ema([torch.zeros(2)], [torch.zeros(2)], momentum=1.5)


def test_teacher_must_be_fp32_and_the_student_may_be_a_generator_of_any_dtype() -> None:
    with pytest.raises(ValueError, match="float32"):
        update_ema([torch.zeros(2, dtype=torch.bfloat16)], [torch.ones(2)], momentum=0.5)
    teacher = [torch.zeros(2), torch.ones(3)]
    update_ema(teacher, (s.to(torch.float64) for s in (torch.ones(2), torch.zeros(3))), momentum=0.75)
    assert teacher[0].dtype == torch.float32 and teacher[0].tolist() == [0.25, 0.25]
    assert teacher[1].tolist() == [0.75, 0.75, 0.75]
    with pytest.raises(ValueError, match="student tensors"):
        update_ema([torch.zeros(2)], (s for s in []), momentum=0.5)
