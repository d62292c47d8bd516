"""Slide-level tasks on bags of tile features: ABMIL classification and MIL survival, over folds, with CIs.

`run_abmil` and `run_survival` take the bags of `contracts.features.iter_slide_bags` and the `EvaluateConfig`;
`evaluate/tasks.py` registers them.

Splits. When every bag has a `split.split_column` value (train/val/test) that split is the one fold. Otherwise
k folds by case (`split.group_column`, the column the patch tasks group by; all slides of a case in one fold;
stratified by class, or by event for survival): fold i is the test set, fold i+1 (mod k) the validation set that
early stopping watches, the other k-2 folds train; when no bag has a case (no `split.group_column`), each slide is its
own case and a WARNING (logged, and `split_warning` in the result's info, so in the report) says that slides of
one patient may then straddle train and test. Validation and test are always distinct (the GPFM/CLAM scripts
reused the validation fold as the test fold), and every case is tested exactly once. The seed, the bootstrap
count and the CI level are the evaluation's own (`EvaluateConfig.seed`, `bootstrap`, `ci_level`), as for the
patch tasks.

Numbers. Each metric's value is the mean over folds of the metric on that fold's test set (what the CLAM/GPFM
papers report). Its CI is the percentile interval of the same fold-mean over `bootstrap` replicates; a
replicate resamples test *cases* with replacement inside every fold (slides of a case move together) and keeps
each fold's model fixed, so the interval reflects test-set sampling, not retraining. A replicate where some fold's
metric is undefined (a class of that fold missing from its resample, no comparable survival pair) is skipped.

Figures. The returned `TaskResult` carries the pooled out-of-fold predictions in input order: class
probabilities (ROC) or survival risk. Risk is given as its within-fold rank in (0, 1], because models of different
folds score on different scales: a median split of the pooled values is then each fold's median split
(Kaplan-Meier curves of low vs high risk, as PORPOISE draws them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedGroupKFold

from gpfm_scale.contracts.features import Bag
from gpfm_scale.errors import GpfmError
from gpfm_scale.evaluate.abmil import fit_abmil, predict_proba, slide_classification_metrics
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.censoring import check_censoring, read_survival_labels
from gpfm_scale.evaluate.metrics import Metric, percentile_ci
from gpfm_scale.evaluate.splits import leakage_warning
from gpfm_scale.evaluate.results import TaskResult
from gpfm_scale.evaluate.survival import concordance_index, fit_survival, predict_risk

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Fold:
    """Unit indices (slides, or cases for case-level survival) of one fold's three parts."""

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class Units:
    """What the model sees: one bag [N, D] per unit, its row, its case and a readable id."""

    features: list[np.ndarray]
    rows: list[dict[str, Any]]
    cases: np.ndarray
    ids: list[str]
    split_warning: str | None = None  # set by make_folds when slides are split with no case column


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _case_ids(bags: Sequence[Bag], column: str | None) -> np.ndarray:
    """Case of each bag from `column`; a bag without one (or every bag, when column is None) is its own case."""
    cases = [b.row.get(column) if column else None for b in bags]
    if column and any(_missing(c) for c in cases):
        log.warning("%d of %d slides have no %r: each of them is its own case", sum(map(_missing, cases)),
                    len(bags), column)
    return np.array([b.slide_id if _missing(c) else str(c) for b, c in zip(bags, cases)], dtype=object)


def folds_from_split_column(rows: list[dict[str, Any]], cases: np.ndarray, column: str) -> list[Fold] | None:
    """The one fold a `split` column defines, or None when no row has one; refuses partial or leaky splits."""
    values = [r.get(column) for r in rows]
    given = [not _missing(v) for v in values]
    if not any(given):
        return None
    if not all(given):
        raise GpfmError(f"{column!r} is set on {sum(given)} of {len(rows)} bags: give it for all or none")
    names = np.array([SPLIT_NAMES.get(str(v).strip().lower(), "?") for v in values], dtype=object)
    if (names == "?").any():
        raise GpfmError(f"{column!r} has values {sorted({str(v) for v, n in zip(values, names) if n == '?'})}; "
                        f"expected train, val, test")
    for case in np.unique(cases):
        seen = set(names[cases == case])
        if len(seen) > 1:
            raise GpfmError(f"case {case!r} has slides in {sorted(seen)}: a case must stay in one split")
    parts = {p: np.flatnonzero(names == p) for p in ("train", "val", "test")}
    empty = [p for p, idx in parts.items() if len(idx) == 0]
    if empty:
        raise GpfmError(f"{column!r} has no {empty} rows; early stopping needs val and reporting needs test")
    return [Fold(0, parts["train"], parts["val"], parts["test"])]


def kfold_by_case(cases: np.ndarray, strata: np.ndarray, num_folds: int, seed: int) -> list[Fold]:
    """k folds with whole cases, stratified by `strata`: test = fold i, val = fold i+1 (mod k), train = the rest."""
    num_cases = len(np.unique(cases))
    if num_cases < num_folds:
        raise GpfmError(f"{num_cases} cases cannot fill {num_folds} folds; lower num_folds or add a split column")
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    fold_of = np.full(len(cases), -1)
    for i, (_, test) in enumerate(splitter.split(np.zeros(len(cases)), strata, groups=cases)):
        fold_of[test] = i
    folds = []
    for i in range(num_folds):
        j = (i + 1) % num_folds
        folds.append(Fold(i, np.flatnonzero((fold_of != i) & (fold_of != j)), np.flatnonzero(fold_of == j),
                          np.flatnonzero(fold_of == i)))
    return folds


def make_folds(units: Units, strata: np.ndarray, cfg: EvaluateConfig) -> list[Fold]:
    folds = folds_from_split_column(units.rows, units.cases, cfg.split.split_column)
    if folds is None:
        column = cfg.split.group_column
        if not column or all(_missing(r.get(column)) for r in units.rows):
            reason = "split.group_column is null" if not column else f"no slide has a {column!r}"
            units.split_warning = leakage_warning("slides are", reason)
            log.warning("%s", units.split_warning)
        folds = kfold_by_case(units.cases, strata, cfg.slide.num_folds, cfg.seed)
    for f in folds:
        log.info("fold %d: %d train, %d val, %d test", f.index, len(f.train), len(f.val), len(f.test))
    return folds


def _case_groups(units: np.ndarray, cases: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`units` sorted by case: (units [n], start of each case [c], units per case [c])."""
    order = np.argsort(cases[units], kind="stable")
    _, starts, counts = np.unique(cases[units][order], return_index=True, return_counts=True)
    return units[order], starts, counts


def _resample_cases(units: np.ndarray, starts: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw as many cases as there are, with replacement; return all units of the drawn cases."""
    drawn = rng.integers(0, len(starts), len(starts))
    lengths = counts[drawn]
    offsets = np.repeat(starts[drawn] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    return units[offsets]


def fold_mean_bootstrap(stat: Callable[[int, np.ndarray], dict[str, float]], folds: list[Fold], cases: np.ndarray,
                        cfg: EvaluateConfig) -> dict[str, Metric]:
    """Mean over folds of `stat(fold index, unit indices)` with a case-resampling percentile CI (module docstring).

    A metric undefined on a whole fold (NaN: e.g. no comparable pair) is averaged over the other folds, with a warning.
    """
    names = list(stat(folds[0].index, folds[0].test))
    full = np.array([[stat(f.index, f.test)[n] for n in names] for f in folds])
    rng = np.random.default_rng(cfg.seed)
    groups = [_case_groups(f.test, cases) for f in folds]
    boots = np.full((cfg.bootstrap, len(folds), len(names)), np.nan)
    for b in range(cfg.bootstrap):
        for k, (f, g) in enumerate(zip(folds, groups)):
            values = stat(f.index, _resample_cases(*g, rng))
            boots[b, k] = [values[n] for n in names]
    out = {}
    for m, n in enumerate(names):
        defined = np.isfinite(full[:, m])
        if not defined.all():
            log.warning("%s is undefined on %d of %d folds; averaged over the others", n, int((~defined).sum()),
                        len(folds))
        value = float(full[defined, m].mean()) if defined.any() else float("nan")
        low, high = percentile_ci(boots[:, defined, m].mean(axis=1), cfg.ci_level) if cfg.bootstrap and \
            defined.any() else (None, None)
        out[n] = Metric(value, low, high)
    return out


def _finite_or_none(values: dict[str, Any]) -> dict[str, Any]:
    """results.json refuses NaN: an undefined number (AUC of a one-class fold) is written as null."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in values.items()}


def _fold_info(fold: Fold, fit: Any, values: dict[str, float], **extra: Any) -> dict[str, Any]:
    return _finite_or_none({"fold": fold.index, "n_train": len(fold.train), "n_val": len(fold.val),
                            "n_test": len(fold.test), "epochs": fit.epochs, "best_epoch": fit.best_epoch,
                            "best_val_score": fit.best_score, **values, **extra})


def _check_bags(bags: Sequence[Bag]) -> None:
    if not bags:
        raise GpfmError("no bags to evaluate")
    dims = {b.features.shape[1] if b.features.ndim == 2 else -1 for b in bags}
    if len(dims) != 1 or -1 in dims:
        raise GpfmError(f"bags must all be [N, D] with one D; found feature dims {sorted(dims)}")
    empty = [b.slide_id for b in bags if len(b.features) == 0]
    if empty:
        raise GpfmError(f"{len(empty)} bags have no tiles (e.g. {empty[0]!r}); drop them before evaluating")


def run_abmil(bags: Sequence[Bag], cfg: EvaluateConfig) -> TaskResult:
    """ABMIL classification over folds (module docstring); metrics auc_macro, balanced_accuracy, f1_weighted/macro."""
    _check_bags(bags)
    labelled = [b for b in bags if not _missing(b.row.get(cfg.slide.label_column))]
    if len(labelled) < len(bags):
        log.warning("%d of %d slides have no %r and are left out", len(bags) - len(labelled), len(bags),
                    cfg.slide.label_column)
    names = np.array([str(b.row[cfg.slide.label_column]) for b in labelled])
    classes = tuple(sorted(set(names)))
    if len(classes) < 2:
        raise GpfmError(f"ABMIL needs at least two classes, found {list(classes)}")
    y = np.searchsorted(np.array(classes), names).astype(np.int64)
    units = Units([b.features for b in labelled], [b.row for b in labelled],
                  _case_ids(labelled, cfg.split.group_column), [b.slide_id for b in labelled])
    folds = make_folds(units, y, cfg)
    prob = np.zeros((len(y), len(classes)))
    info = []
    for f in folds:
        model, fit = fit_abmil(([units.features[i] for i in f.train], y[f.train]),
                               ([units.features[i] for i in f.val], y[f.val]), len(classes), cfg.slide.model,
                               cfg.slide.train, cfg.seed + f.index)
        prob[f.test] = predict_proba(model, [units.features[i] for i in f.test], cfg.slide.train.device)
        info.append(_fold_info(f, fit, slide_classification_metrics(y[f.test], prob[f.test])))
    present = {f.index: np.unique(y[f.test]) for f in folds}

    def stat(k: int, idx: np.ndarray) -> dict[str, float]:
        values = slide_classification_metrics(y[idx], prob[idx])
        if not np.isin(present[k], y[idx]).all():
            values["auc_macro"] = float("nan")
        return values

    metrics = fold_mean_bootstrap(stat, folds, units.cases, cfg)
    return TaskResult(metrics, y_true=y, scores=prob, classes=classes,
                      info=_info(cfg, folds, info, units, classes=list(classes)))


def _survival_units(bags: Sequence[Bag], cfg: EvaluateConfig) -> tuple[Units, np.ndarray, np.ndarray, str]:
    """Per-slide labels read and checked, then pooled per case when unit == "case" (slides of one case agree)."""
    times, events, source = read_survival_labels([b.row for b in bags], cfg.slide.survival)
    cases = _case_ids(bags, cfg.split.group_column)
    if cfg.slide.survival.unit == "slide":
        return Units([b.features for b in bags], [b.row for b in bags], cases, [b.slide_id for b in bags]), \
            times, events, source
    order = list(dict.fromkeys(cases))
    members = [np.flatnonzero(cases == c) for c in order]
    splits = [str(b.row.get(cfg.split.split_column)) for b in bags]
    for case, idx in zip(order, members):
        if np.ptp(times[idx]) > 0 or len(set(events[idx])) > 1 or len({splits[i] for i in idx}) > 1:
            raise GpfmError(f"case {case!r}: its slides disagree on time/event/split ({times[idx]}, {events[idx]}, "
                            f"{[splits[i] for i in idx]})")
    first = [int(idx[0]) for idx in members]
    units = Units([np.concatenate([bags[int(i)].features for i in idx]) for idx in members],
                  [bags[i].row for i in first], np.array(order, dtype=object), [str(c) for c in order])
    return units, times[first], events[first], source


def _within_fold_rank(risk: np.ndarray, folds: list[Fold]) -> np.ndarray:
    out = np.zeros(len(risk))
    for f in folds:
        out[f.test] = rankdata(risk[f.test]) / len(f.test)
    return out


def run_survival(bags: Sequence[Bag], cfg: EvaluateConfig) -> TaskResult:
    """MIL survival over folds (module docstring); metric c_index. Refuses flipped or inconsistent labels."""
    _check_bags(bags)
    units, times, events, source = _survival_units(bags, cfg)
    check = check_censoring(times, events, cfg.slide.survival, source)
    folds = make_folds(units, events.astype(np.int64), cfg)
    risk = np.zeros(len(times))
    info = []
    for f in folds:
        model, fit, edges = fit_survival(([units.features[i] for i in f.train], times[f.train], events[f.train]),
                                         ([units.features[i] for i in f.val], times[f.val], events[f.val]),
                                         cfg.slide.model, cfg.slide.train, cfg.slide.survival, cfg.seed + f.index)
        risk[f.test] = predict_risk(model, [units.features[i] for i in f.test], cfg.slide.survival.loss,
                                    cfg.slide.train.device)
        c = concordance_index(times[f.test], events[f.test], risk[f.test])
        info.append(_fold_info(f, fit, {"c_index": c}, bin_edges=None if edges is None else edges.tolist()))

    def stat(_: int, idx: np.ndarray) -> dict[str, float]:
        return {"c_index": concordance_index(times[idx], events[idx], risk[idx])}

    metrics = fold_mean_bootstrap(stat, folds, units.cases, cfg)
    return TaskResult(metrics, times=times, events=events, risk=_within_fold_rank(risk, folds),
                      info=_info(cfg, folds, info, units, censoring=_finite_or_none(asdict(check)),
                                 unit=cfg.slide.survival.unit, loss=cfg.slide.survival.loss))


def _info(cfg: EvaluateConfig, folds: list[Fold], per_fold: list[dict[str, Any]], units: Units,
          **extra: Any) -> dict[str, Any]:
    scheme = "split column" if len(folds) == 1 else f"{len(folds)}-fold by case (test i, val i+1)"
    if units.split_warning:
        extra["split_warning"] = units.split_warning
    return {"splits": scheme, "seed": cfg.seed, "folds": per_fold, "ids": units.ids,
            "ci": f"{cfg.ci_level:.0%} percentile bootstrap of the fold mean ({cfg.bootstrap} replicates, "
                  f"test cases resampled within each fold)", **extra}
