"""Metrics against scikit-learn on fixed inputs; bootstrap intervals against hand computations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score, top_k_accuracy_score

from gpfm_scale.evaluate.metrics import (Metric, balanced_accuracy, bootstrap_indices, bootstrap_mean,
                                         classification_metrics, f1, macro_auc, percentile_ci, top_k_accuracy)


def _fixed(n: int = 80, c: int = 3, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Labels [n] and softmax scores [n, c] that lean towards the true class (a realistic, imperfect model)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.2 * np.eye(c)[y]
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def test_balanced_accuracy_and_f1_match_sklearn():
    y, p = _fixed()
    pred = p.argmax(1)
    assert balanced_accuracy(y, pred, 3) == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert f1(y, pred, "weighted", 3) == pytest.approx(f1_score(y, pred, average="weighted"), abs=1e-12)
    assert f1(y, pred, "macro", 3) == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)


def test_f1_and_bacc_conventions_for_absent_classes_match_sklearn_defaults():
    y = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 3, 0])  # class 3 predicted, never true; num_classes 5 (class 4 nowhere)
    assert f1(y, pred, "macro", 5) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert f1(y, pred, "weighted", 5) == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0))
    with pytest.warns(UserWarning):
        expected = balanced_accuracy_score(y, pred)
    assert balanced_accuracy(y, pred, 5) == pytest.approx(expected)


def test_macro_auc_matches_sklearn_multiclass_binary_and_ties():
    y, p = _fixed(c=4)
    assert macro_auc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    yb, pb = _fixed(c=2, seed=3)
    assert macro_auc(yb, pb) == pytest.approx(roc_auc_score(yb, pb[:, 1]), abs=1e-12)
    tied = np.round(pb, 1)  # many ties: counted half, as the trapezoidal area
    assert macro_auc(yb, tied) == pytest.approx(roc_auc_score(yb, tied[:, 1]), abs=1e-12)


def test_top_k_accuracy_matches_sklearn():
    y, p = _fixed(c=5)
    for k in (1, 2, 3):
        assert top_k_accuracy(y, p, k) == pytest.approx(top_k_accuracy_score(y, p, k=k, labels=range(5)))


def test_bootstrap_indices_are_the_documented_draw():
    expected = np.random.default_rng(11).integers(0, 4, size=(6, 4))
    np.testing.assert_array_equal(bootstrap_indices(4, 6, 11), expected)


def test_percentile_ci_by_hand_on_a_tiny_case():
    values = np.array([0.0, 1.0, 2.0])
    n_boot, seed = 5, 3
    idx = bootstrap_indices(3, n_boot, seed)
    means = sorted(values[row].mean() for row in idx)
    # numpy's linear percentile: position q * (B - 1) in the sorted resample means
    lo = means[0] + 0.025 * 4 * (means[1] - means[0])
    hi = means[3] + (0.975 * 4 - 3) * (means[4] - means[3])
    m = bootstrap_mean(values, n_boot, seed)
    assert m.value == pytest.approx(1.0)
    assert (m.ci_low, m.ci_high) == (pytest.approx(lo), pytest.approx(hi))


def test_two_point_case_covers_the_whole_range():
    # hits [1, 0]: resample means are 0 (p 1/4), 0.5 (1/2), 1 (1/4), so the 95% interval is [0, 1]
    m = bootstrap_mean(np.array([1.0, 0.0]), 2000, 0)
    assert (m.value, m.ci_low, m.ci_high) == (0.5, 0.0, 1.0)


def test_perfect_predictions_have_degenerate_intervals():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    scores = np.eye(3)[y] * 0.8 + 0.1
    out = classification_metrics(y, scores, n_boot=200, seed=0)
    for name in ("balanced_accuracy", "f1_weighted", "f1_macro", "auc_macro"):
        assert (out[name].value, out[name].ci_low, out[name].ci_high) == (1.0, 1.0, 1.0), name


def test_vectorised_bootstrap_equals_a_sklearn_loop_skipping_auc_resamples_missing_a_class():
    y, p = _fixed(n=30, c=3, seed=5)
    y[y == 2] = 1
    y[:2] = 2  # a rare class: many resamples miss it and are skipped for AUC only
    n_boot, seed = 200, 4
    out = classification_metrics(y, p, n_boot=n_boot, seed=seed, top_k=(2,))
    pred = p.argmax(1)
    bacc, f1w, f1m, auc, top2 = [], [], [], [], []
    for row in bootstrap_indices(len(y), n_boot, seed):
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true": recall over y_true's classes
            warnings.simplefilter("ignore")
            bacc.append(balanced_accuracy_score(y[row], pred[row]))
        f1w.append(f1_score(y[row], pred[row], average="weighted", zero_division=0))
        f1m.append(f1_score(y[row], pred[row], average="macro", zero_division=0))
        if len(np.unique(y[row])) == 3:
            auc.append(roc_auc_score(y[row], p[row], multi_class="ovr"))
        top2.append(top_k_accuracy_score(y[row], p[row], k=2, labels=range(3)))
    assert len(auc) < n_boot  # the skip rule was exercised
    for name, values in (("balanced_accuracy", bacc), ("f1_weighted", f1w), ("f1_macro", f1m), ("auc_macro", auc),
                         ("top2_accuracy", top2)):
        lo, hi = np.percentile(values, [2.5, 97.5])
        assert (out[name].ci_low, out[name].ci_high) == (pytest.approx(lo), pytest.approx(hi)), name
    assert out["auc_macro"].value == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))


def test_metric_json_form_maps_nan_to_none_and_back():
    assert Metric(float("nan"), None, None).to_dict() == {"value": None, "ci_low": None, "ci_high": None}
    m = Metric(0.5, 0.25, 0.75)
    assert Metric.from_dict(m.to_dict()) == m
    assert np.isnan(Metric.from_dict({"value": None}).value)
    assert percentile_ci(np.array([np.nan])) == (None, None)
