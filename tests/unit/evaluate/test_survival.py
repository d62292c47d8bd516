"""MIL survival: the NLL and Cox losses against hand computations and scikit-survival, the time bins, the c-index,
and both models ranking synthetic survival times generated from a known feature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from gpfm_scale.evaluate.slide_config import MilModelConfig, MilTrainConfig, SurvivalConfig
from gpfm_scale.evaluate.survival import (
    assign_bins,
    concordance_index,
    cox_partial_loss,
    fit_survival,
    nll_hazard_loss,
    predict_risk,
    quantile_bin_edges,
    risk_from_outputs,
)
from gpfm_scale.evaluate.synthetic_bags import make_survival_bags

torch.set_num_threads(1)


def test_nll_loss_matches_hand_computation():
    """Patient A: event in bin 2; patient B: censored in bin 1 (so it survived bins 0 and 1)."""
    hazards = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.2, 0.1]])
    a = -math.log(0.9 * 0.8) - math.log(0.3)
    b = -math.log(0.5 * 0.75)
    loss = nll_hazard_loss(hazards, torch.tensor([2, 1]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((a + b) / 2, rel=1e-6)
    first_bin_event = nll_hazard_loss(hazards[:1], torch.tensor([0]), torch.tensor([1.0]))
    assert first_bin_event.item() == pytest.approx(-math.log(0.1), rel=1e-6)
    uncensored_only = nll_hazard_loss(hazards, torch.tensor([2, 1]), torch.tensor([1.0, 0.0]), alpha=1.0)
    assert uncensored_only.item() == pytest.approx(a / 2, rel=1e-6)


def test_cox_loss_matches_breslow_by_hand():
    """Times 1, 2, 2, 3 with events 1, 1, 1, 0: the two events tied at t=2 share the risk set {1, 2, 3}."""
    risk = [0.5, -0.2, 0.1, 0.3]
    e = [math.exp(r) for r in risk]
    expected = -((0.5 - math.log(sum(e))) + (-0.2 - math.log(sum(e[1:]))) + (0.1 - math.log(sum(e[1:])))) / 3
    loss = cox_partial_loss(torch.tensor(risk), torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1, 1, 1, 0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert cox_partial_loss(torch.tensor(risk), torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.zeros(4)) is None


def test_cox_loss_fits_the_coefficients_of_sksurv_breslow():
    """A linear Cox model trained with our loss lands on sksurv's Breslow estimate (tied integer times)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 2))
    times = np.ceil(rng.exponential(np.exp(-(x @ np.array([0.8, -0.5]))) * 5))
    events = rng.random(80) < 0.7
    reference = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(x, Surv.from_arrays(events, times)).coef_
    beta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    xt, tt, et = torch.from_numpy(x), torch.from_numpy(times), torch.from_numpy(events.astype(np.float64))
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = cox_partial_loss(xt @ beta, tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), reference, atol=1e-4)


def test_quantile_bins_come_from_uncensored_times():
    times = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 0.5])
    events = np.array([1, 1, 1, 1, 1, 0, 0])
    edges = quantile_bin_edges(times, events, 4)
    np.testing.assert_allclose(edges, [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(assign_bins(np.array([0.1, 1.99, 2.0, 3.5, 4.0, 1e6]), edges), [0, 0, 1, 2, 3, 3])


def test_c_index_by_hand_and_against_sksurv():
    times, events = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 1, 1])
    assert concordance_index(times, events, np.array([4.0, 3.0, 1.0, 2.0])) == pytest.approx(3 / 4)
    assert concordance_index(times, events, np.array([4.0, 3.0, 2.0, 2.0])) == pytest.approx(3.5 / 4)
    rng = np.random.default_rng(1)
    t, e, r = rng.integers(1, 10, 50).astype(float), rng.random(50) < 0.6, rng.integers(0, 5, 50).astype(float)
    assert concordance_index(t, e, r) == concordance_index_censored(e, t, r)[0]
    assert np.isnan(concordance_index(times, np.zeros(4), np.arange(4.0)))


def test_nll_risk_grows_with_the_hazards():
    logits = torch.tensor([[-2.0, -2.0, -2.0, -2.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    risk = risk_from_outputs(logits, "nll")
    assert risk[0] < risk[1] < risk[2]
    s = np.cumprod(1 - 1 / (1 + np.exp(-logits.numpy()[1])))
    assert risk[1] == pytest.approx(-s.sum())


@pytest.mark.parametrize("loss", ["nll", "cox"])
def test_survival_models_rank_synthetic_times(loss):
    bags = make_survival_bags(num_cases=100, dim=16, seed=0)
    times = np.array([b.row["time"] for b in bags])
    events = np.array([b.row["event"] for b in bags], dtype=bool)
    feats = [b.features for b in bags]
    part = {"train": slice(0, 60), "val": slice(60, 75), "test": slice(75, 100)}
    train_cfg = MilTrainConfig(max_epochs=12, min_epochs=4, patience=4, cox_batch_size=16, device="cpu")
    model, _, edges = fit_survival(*[(feats[s], times[s], events[s]) for s in (part["train"], part["val"])],
                                     MilModelConfig(), train_cfg, SurvivalConfig(loss=loss), seed=0)
    s = part["test"]
    c = concordance_index(times[s], events[s], predict_risk(model, feats[s], loss, "cpu"))
    assert c > 0.7
    assert (edges is None) == (loss == "cox")
