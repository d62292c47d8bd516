"""Slide tasks end to end: folds by case with distinct val/test, split columns, the fold-mean bootstrap, and
ABMIL / survival runs on synthetic bags returning what the report draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpfm_scale.contracts.features import Bag, iter_slide_bags, write_index, write_slide_features
from gpfm_scale.errors import GpfmError
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.slide_tasks import (
    Fold,
    fold_mean_bootstrap,
    folds_from_split_column,
    kfold_by_case,
    run_abmil,
    run_survival,
)
from gpfm_scale.evaluate.synthetic_bags import make_survival_bags, make_two_class_bags

torch.set_num_threads(1)
FAST = {"bootstrap": 50, "slide": {"num_folds": 3, "train": {"max_epochs": 10, "min_epochs": 4, "patience": 3,
                                                               "cox_batch_size": 16, "device": "cpu"}}}


def fast(**slide) -> EvaluateConfig:
    """FAST with `slide` keys replaced (train merged)."""
    train = {**FAST["slide"]["train"], **slide.pop("train", {})}
    return EvaluateConfig.model_validate({**FAST, "slide": {**FAST["slide"], **slide, "train": train}})


def test_kfold_by_case_keeps_cases_whole_and_tests_every_slide_once():
    rng = np.random.default_rng(0)
    cases = np.repeat([f"c{i}" for i in range(23)], rng.integers(1, 4, 23))
    strata = np.array([int(c[1:]) % 2 for c in cases])
    folds = kfold_by_case(cases, strata, 5, seed=0)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(len(cases)))
    test_fold_of_case = {}
    for f in folds:
        parts = [set(f.train), set(f.val), set(f.test)]
        assert f.val.size and f.test.size and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert sorted(np.concatenate([f.train, f.val, f.test]).tolist()) == list(range(len(cases)))
        assert not set(cases[f.train]) & (set(cases[f.val]) | set(cases[f.test]))
        assert not set(cases[f.val]) & set(cases[f.test])
        for c in set(cases[f.test]):
            assert test_fold_of_case.setdefault(c, f.index) == f.index
        np.testing.assert_array_equal(f.val, folds[(f.index + 1) % 5].test)


def test_split_column_gives_one_fold_and_refuses_leaks_and_gaps():
    cases = np.array(["a", "a", "b", "c", "d"])
    rows = [{"split": s} for s in ("train", "train", "Valid", "test", "train")]
    (fold,) = folds_from_split_column(rows, cases, "split")
    assert fold.train.tolist() == [0, 1, 4] and fold.val.tolist() == [2] and fold.test.tolist() == [3]
    assert folds_from_split_column([{}] * 5, cases, "split") is None
    with pytest.raises(GpfmError, match="one split"):
        folds_from_split_column([{"split": s} for s in ("train", "test", "val", "test", "train")], cases, "split")
    with pytest.raises(GpfmError, match="no \\['val'\\]"):
        folds_from_split_column([{"split": s} for s in ("train", "train", "test", "test", "train")], cases, "split")
    with pytest.raises(GpfmError, match="for all or none"):
        folds_from_split_column(rows[:4] + [{"split": float("nan")}], cases, "split")


def test_fold_mean_bootstrap_averages_folds_and_resamples_whole_cases():
    """Two slides per case: a resample that moves cases whole always holds an even number of slides."""
    cases = np.repeat(np.arange(12), 2)
    x = np.arange(24, dtype=float)
    folds = [Fold(0, np.array([], int), np.array([], int), np.arange(0, 12)),
             Fold(1, np.array([], int), np.array([], int), np.arange(12, 24))]
    sizes = []

    def stat(_, idx):
        sizes.append(len(idx))
        return {"mean": float(x[idx].mean())}

    cfg = EvaluateConfig(bootstrap=200)
    out = fold_mean_bootstrap(stat, folds, cases, cfg)
    assert out["mean"].value == pytest.approx((5.5 + 17.5) / 2)
    assert out["mean"].ci_low < out["mean"].value < out["mean"].ci_high
    assert all(n % 2 == 0 and n == 12 for n in sizes)
    assert fold_mean_bootstrap(stat, folds, cases, EvaluateConfig(bootstrap=0))["mean"].ci_low is None
    undefined_on_fold_1 = fold_mean_bootstrap(lambda k, idx: {"m": float("nan") if k else 1.0}, folds, cases, cfg)
    assert (undefined_on_fold_1["m"].value, undefined_on_fold_1["m"].ci_low) == (1.0, 1.0)


def test_bags_read_back_from_an_embedding_directory(tmp_path):
    """The features contract: rows come from index.parquet (numpy scalars, NaN for missing values)."""
    rows = []
    for b in make_survival_bags(num_cases=30, dim=8, seed=3):
        rel = write_slide_features(tmp_path, b.slide_id, b.features, b.coords, model="synthetic")
        rows.append({**b.row, "file": rel, "row": -1, "n": len(b.features), "split": None})
    write_index(tmp_path, rows)
    bags = list(iter_slide_bags(tmp_path))
    cfg = fast(train={"max_epochs": 2, "min_epochs": 0})
    result = run_survival(bags, cfg)
    assert result.info["ids"] == [r["case_id"] for r in rows] and np.isfinite(result.metrics["c_index"].value)


def test_abmil_task_over_folds():
    bags = make_two_class_bags(num_cases=40, dim=16, seed=2, slides_per_case=2)
    result = run_abmil(bags, fast(num_folds=4))
    assert set(result.metrics) == {"auc_macro", "balanced_accuracy", "f1_weighted", "f1_macro"}
    folds = result.info["folds"]
    assert len(folds) == 4 and sum(f["n_test"] for f in folds) == len(bags)
    for name, metric in result.metrics.items():
        assert metric.value == pytest.approx(np.mean([f[name] for f in folds]))
        assert metric.ci_low <= metric.ci_high
    assert result.metrics["auc_macro"].value > 0.9
    assert result.scores.shape == (len(bags), 2) and np.allclose(result.scores.sum(1), 1)
    np.testing.assert_array_equal(result.y_true, [b.row["label"] for b in bags])
    assert result.classes == ("0", "1") and result.info["ids"] == [b.slide_id for b in bags]
    json.dumps(result.info, allow_nan=False)


def _two_slides_per_case(bags: list[Bag]) -> list[Bag]:
    out = []
    for b in bags:
        half = len(b.features) // 2
        for s, part in enumerate((slice(0, half), slice(half, None))):
            slide_id = f"{b.slide_id}_s{s}"
            out.append(Bag(slide_id, b.features[part], b.coords[part], {**b.row, "slide_id": slide_id}))
    return out


def test_survival_task_pools_slides_per_case_and_refuses_flipped_labels():
    bags = _two_slides_per_case(make_survival_bags(num_cases=60, dim=16, seed=1))
    result = run_survival(bags, fast())
    assert set(result.metrics) == {"c_index"} and result.metrics["c_index"].value > 0.65
    assert len(result.times) == 60 and result.info["ids"] == [f"case{i:03d}" for i in range(60)]
    assert result.info["censoring"]["suspect"] is False and result.info["unit"] == "case"
    assert all(len(f["bin_edges"]) == 3 for f in result.info["folds"])
    assert 0 < result.risk.min() and result.risk.max() == 1.0
    json.dumps(result.info, allow_nan=False)
    flipped = [Bag(b.slide_id, b.features, b.coords, {**b.row, "event": 1 - b.row["event"]}) for b in bags]
    with pytest.raises(GpfmError, match="look flipped"):
        run_survival(flipped, fast())


def test_slides_of_a_case_must_agree_and_empty_bags_are_refused():
    bags = _two_slides_per_case(make_survival_bags(num_cases=6, dim=4, seed=0))
    bags[1] = Bag(bags[1].slide_id, bags[1].features, bags[1].coords, {**bags[1].row, "time": 999.0})
    with pytest.raises(GpfmError, match="disagree"):
        run_survival(bags, fast())
    empty = [Bag("s0", np.zeros((0, 4), np.float32), np.zeros((0, 2), np.int64), {"label": 1})]
    with pytest.raises(GpfmError, match="no tiles"):
        run_abmil(empty, fast())
