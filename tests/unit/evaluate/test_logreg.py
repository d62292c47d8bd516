"""The `logreg` task (issue 13.10): scikit-learn's logistic regression as UNI/CONCH run it, registered beside the
torch probe: same predictions as sklearn's own fit on the same rows, UNI's C, listed in `evaluate --help`."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from gpfm_scale.cli import build_parser
from gpfm_scale.errors import GpfmError
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.patch_tasks import uni_cost
from gpfm_scale.evaluate.splits import PatchData
from gpfm_scale.evaluate.tasks import EVAL_TASKS, default_rank_metrics


def _data(n: int = 150, dim: int = 12, seed: int = 0) -> PatchData:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (rng.normal(size=(n, dim)) + 1.5 * np.eye(dim)[y]).astype(np.float32)
    split = np.array(["train"] * 90 + ["val"] * 15 + ["test"] * 45, dtype=object)
    return PatchData(x, y.astype(np.int64), ("a", "b", "c"), split, np.arange(n).astype(str))


def test_logreg_matches_sklearns_own_fit_on_train_plus_val():
    data = _data()
    result = EVAL_TASKS.get("logreg").load()(data, EvaluateConfig(bootstrap=20))
    fit = data.split != "test"
    ref = LogisticRegression(C=12 * 3 / 100, solver="lbfgs", max_iter=1000, random_state=0)
    ref.fit(data.features[fit], data.labels[fit])
    x_te, y_te = data.part("test")
    np.testing.assert_array_equal(result.scores.argmax(1), ref.predict(x_te))
    np.testing.assert_allclose(result.scores, ref.predict_proba(x_te), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(result.y_true, y_te)
    assert result.info["C"] == pytest.approx(0.36) and result.metrics["balanced_accuracy"].value > 0.6


def test_logreg_C_is_uni_lambda_unless_set():
    assert uni_cost(1024, 9) == pytest.approx(1 / (100 / (1024 * 9)))  # lambda = 100 / (M * C)
    result = EVAL_TASKS.get("logreg").load()(_data(), EvaluateConfig(bootstrap=0, logreg={"C": 0.01}))
    assert result.info["C"] == 0.01


def test_logreg_is_registered_ranked_drawn_and_listed_in_help():
    task = EVAL_TASKS.get("logreg")
    assert task.kind == "patch" and default_rank_metrics()["logreg"] == "balanced_accuracy"
    assert {"roc", "confusion"} <= set(task.plots)
    sub = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    assert "logreg" in " ".join(sub.format_help().split())


def test_logreg_refuses_a_class_missing_from_train_and_val():
    data = _data()
    labels = data.labels.copy()
    labels[(data.split != "test") & (labels == 2)] = 0
    with pytest.raises(GpfmError, match="class has no train/val row"):
        EVAL_TASKS.get("logreg").load()(PatchData(data.features, labels, data.classes, data.split, data.ids),
                                        EvaluateConfig(bootstrap=0))
