"""Classification metrics and percentile-bootstrap confidence intervals, in numpy.

Written from confusion matrices and ranks rather than by calling scikit-learn in a loop: a 1,000-resample
bootstrap of every metric then costs milliseconds, and the tests still check each value against scikit-learn.

Conventions (each matches scikit-learn's default call, which the tests use as the reference):
- balanced accuracy: mean recall over the classes present in `y_true`.
- F1 macro / weighted: over the classes present in `y_true` or `y_pred`; a class with no true and no
  predicted sample contributes nothing; 0/0 precision or recall counts as 0 (sklearn's `zero_division`).
- macro AUC: one-vs-rest, the mean over classes of the AUC of `scores[:, c]` for "class c vs the rest";
  binary (C == 2) is the single AUC of `scores[:, 1]`, as `roc_auc_score(y, p[:, 1])`. Ties count half
  (Mann-Whitney U), which equals the trapezoidal ROC area.
- top-k accuracy: the true class is among the k highest scores (ties broken by the lower class index).

Bootstrap: `n_boot` resamples of the evaluation set's indices, drawn with replacement by
`numpy.random.default_rng(seed).integers(0, n, (n_boot, n))`; the interval is the percentile interval
(`numpy.percentile`, linear interpolation) at (1 - level) / 2 and (1 + level) / 2. Every metric of one
evaluation uses the same resamples. For AUC, a resample that lacks one of the classes present in the full
`y_true` has no defined macro AUC and is skipped (not redrawn, not stratified): the interval is taken over
the remaining resamples, and their count is logged. Stratifying would hide the class-count variance that
the bootstrap is meant to show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import rankdata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    """One reported number: its value on the full evaluation set and its 95% CI (None when not bootstrapped)."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready: a NaN (undefined, e.g. AUC of a one-class test set) becomes None."""
        return {"value": _opt(self.value), "ci_low": _opt(self.ci_low), "ci_high": _opt(self.ci_high)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metric:
        value = _opt(data.get("value"))
        return cls(float("nan") if value is None else value, _opt(data.get("ci_low")), _opt(data.get("ci_high")))

    def __str__(self) -> str:
        if self.ci_low is None or self.ci_high is None:
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def _opt(x: Any) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class."""
    codes = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 [C] and support [C] (true count) of each class from cm [C, C] (rows true).

    0/0 counts as 0, as sklearn's `precision_recall_fscore_support(zero_division=0)`: a class never predicted
    has precision 0, a class absent from the test set recall 0 (its support says why).
    """
    tp = np.diagonal(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(tp.shape), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(tp.shape), where=support > 0)
    denom = support + predicted
    f1_score = np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1_score, "support": support}


def _batched_confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, idx: np.ndarray) -> np.ndarray:
    """[B, C, C] confusion matrices of the resamples idx [B, n]."""
    cc = num_classes * num_classes
    codes = (np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64))[idx]
    codes = codes + (np.arange(len(idx), dtype=np.int64) * cc)[:, None]
    return np.bincount(codes.ravel(), minlength=len(idx) * cc).reshape(len(idx), num_classes, num_classes)


def balanced_accuracy_cm(cm: np.ndarray) -> np.ndarray:
    """Mean recall over classes with support, for cm [..., C, C]."""
    support = cm.sum(-1)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    recall = np.divide(tp, support, out=np.zeros(tp.shape, float), where=support > 0)
    return recall.sum(-1) / np.maximum((support > 0).sum(-1), 1)


def f1_cm(cm: np.ndarray, average: str) -> np.ndarray:
    """F1 'macro' or 'weighted' for cm [..., C, C] (conventions in the module docstring)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    support = cm.sum(-1)
    predicted = cm.sum(-2)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape, float), where=denom > 0)
    if average == "macro":
        return f1.sum(-1) / np.maximum((denom > 0).sum(-1), 1)
    if average == "weighted":
        return (f1 * support).sum(-1) / np.maximum(support.sum(-1), 1)
    raise ValueError(f"average must be 'macro' or 'weighted', got {average!r}")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> float:
    c = num_classes or int(max(np.max(y_true), np.max(y_pred))) + 1
    return float(balanced_accuracy_cm(confusion_matrix(y_true, y_pred, c)))


def f1(y_true: np.ndarray, y_pred: np.ndarray, average: str = "weighted", num_classes: int | None = None) -> float:
    c = num_classes or int(max(np.max(y_true), np.max(y_pred))) + 1
    return float(f1_cm(confusion_matrix(y_true, y_pred, c), average))


def _auc_rows(pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """AUC per row of pos/score [B, n] by the rank-sum formula; NaN where a row has no positive or negative."""
    ranks = rankdata(score, axis=-1)
    n_pos = pos.sum(-1)
    n_neg = pos.shape[-1] - n_pos
    u = (ranks * pos).sum(-1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _macro_auc_rows(y: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC per row: y [B, n], scores [B, n, C], over `classes`; binary uses column 1."""
    if scores.shape[-1] == 2:
        return _auc_rows(y == 1, scores[..., 1])
    per_class = [_auc_rows(y == c, scores[..., c]) for c in classes]
    return np.mean(per_class, axis=0)


def macro_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro one-vs-rest AUC of scores [N, C] (C >= 2) over the classes present in y_true."""
    y = np.asarray(y_true)
    scores = np.asarray(scores, float)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    return float(_macro_auc_rows(y[None], scores[None], present)[0])


def top_k_hits(y_true: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """[N] bool: the true class is among the k highest-scoring classes of scores [N, C]."""
    order = np.argsort(-np.asarray(scores, float), axis=1, kind="stable")[:, :k]
    return (order == np.asarray(y_true)[:, None]).any(1)


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    return float(top_k_hits(y_true, scores, k).mean())


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resampled indices (with replacement): the one source of randomness of every CI."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of finite bootstrap values; (None, None) when there are none."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None, None
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> Metric:
    """Mean of per-sample values [N] (hits, losses) with its percentile CI."""
    v = np.asarray(values, float)
    boots = v[bootstrap_indices(len(v), n_boot, seed)].mean(1) if n_boot > 0 else np.array([])
    return Metric(float(v.mean()), *percentile_ci(boots, level))


def bootstrap_statistic(fn: Callable[[np.ndarray], float], n: int, n_boot: int, seed: int,
                        level: float = 0.95) -> Metric:
    """Any statistic `fn(indices)` over the full set and over each resample; NaN resamples are skipped."""
    value = fn(np.arange(n))
    boots = np.array([fn(i) for i in bootstrap_indices(n, n_boot, seed)]) if n_boot > 0 else np.array([])
    return Metric(float(value), *percentile_ci(boots, level))


def _bootstrap_auc(y: np.ndarray, scores: np.ndarray, idx: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Macro AUC of each resample idx [B, n]; NaN for resamples missing a class of the full y."""
    present = np.unique(y)
    out = []
    for start in range(0, len(idx), chunk):
        part = idx[start:start + chunk]
        yb = y[part]
        complete = np.array([np.isin(present, row).all() for row in yb])
        aucs = _macro_auc_rows(yb, scores[part], present)
        out.append(np.where(complete, aucs, np.nan))
    boots = np.concatenate(out) if out else np.array([])
    skipped = int(np.isnan(boots).sum())
    if skipped:
        log.info("AUC bootstrap: %d of %d resamples lack a class and were skipped", skipped, len(boots))
    return boots


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                           level: float = 0.95, top_k: tuple[int, ...] = ()) -> dict[str, Metric]:
    """Balanced accuracy, weighted/macro F1, macro AUC (+ top-k accuracy) with bootstrap CIs.

    y_true [N] int class indices in [0, C); scores [N, C] class scores (probabilities or any monotone
    score); the prediction is argmax. All metrics share the same `n_boot` resamples drawn from `seed`.
    """
    y = np.asarray(y_true, np.int64)
    scores = np.asarray(scores, float)
    num_classes = scores.shape[1]
    pred = scores.argmax(1)
    idx = bootstrap_indices(len(y), n_boot, seed)
    cm = confusion_matrix(y, pred, num_classes)
    cms = _batched_confusion(y, pred, num_classes, idx) if n_boot > 0 else np.zeros((0, num_classes, num_classes))
    out = {
        "balanced_accuracy": Metric(float(balanced_accuracy_cm(cm)), *percentile_ci(balanced_accuracy_cm(cms), level)),
        "f1_weighted": Metric(float(f1_cm(cm, "weighted")), *percentile_ci(f1_cm(cms, "weighted"), level)),
        "f1_macro": Metric(float(f1_cm(cm, "macro")), *percentile_ci(f1_cm(cms, "macro"), level)),
        "auc_macro": Metric(macro_auc(y, scores), *percentile_ci(_bootstrap_auc(y, scores, idx), level)),
    }
    for k in top_k:
        if k <= num_classes:
            hits = top_k_hits(y, scores, k).astype(float)
            out[f"top{k}_accuracy"] = Metric(float(hits.mean()), *percentile_ci(hits[idx].mean(1), level))
    return out
