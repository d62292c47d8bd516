"""KoLeoLoss: value on known points, normalisation, per-chunk sum, and the near-duplicate guard."""

from __future__ import annotations

import math

import pytest
import torch

from gpfm_scale.models.losses import KoLeoLoss


def _three_points() -> torch.Tensor:
    # unit circle at 0, 60 and 180 degrees: nearest distances 1 (0<->60), 1, and sqrt(3) (180 -> 60)
    return torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]])


def test_value_on_three_known_points() -> None:
    loss = KoLeoLoss()
    assert loss(_three_points()).item() == pytest.approx(-(0 + 0 + math.log(math.sqrt(3))) / 3, rel=1e-5)
    assert loss.num_guarded == 0


def test_inputs_are_l2_normalised_first() -> None:
    scaled = _three_points() * torch.tensor([[3.0], [0.2], [7.0]])
    assert KoLeoLoss()(scaled).item() == pytest.approx(-math.log(3) / 6, rel=1e-5)


def test_duplicates_are_guarded_counted_and_finite() -> None:
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], requires_grad=True)  # rows 0 and 1 coincide
    loss = KoLeoLoss(eps=1e-8)
    value = loss(x)
    expected = -(2 * math.log(1e-8) + math.log(math.sqrt(2))) / 3
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert loss.num_guarded == 2
    value.backward()
    assert torch.isfinite(x.grad).all()
    loss(_three_points())
    assert loss.num_guarded == 0  # the counter describes the last call only


def test_chunks_are_scored_separately_and_summed() -> None:
    a = _three_points()
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # nearest distances all sqrt(2)
    value = KoLeoLoss()(torch.cat([a, b]), num_chunks=2).item()
    assert value == pytest.approx(-math.log(3) / 6 - math.log(math.sqrt(2)), rel=1e-5)


def test_needs_two_rows_per_chunk() -> None:
    with pytest.raises(ValueError, match=">= 2 rows"):
        KoLeoLoss()(torch.ones(2, 3), num_chunks=2)
