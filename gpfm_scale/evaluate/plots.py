"""PNG figures of the evaluation report: embedding PCA, ROC curves, confusion matrices, the rank heat-map,
Kaplan-Meier curves.

matplotlib's object API (`Figure`, no pyplot): no global backend switch, no display needed on cluster nodes,
no figure left open between calls; every function writes one file and returns its path. PCA rather than
UMAP: umap-learn is not a dependency, and PCA is deterministic.
"""

from __future__ import annotations

import io
import logging
import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score, roc_curve
from sksurv.compare import compare_survival
from sksurv.nonparametric import kaplan_meier_estimator

from gpfm_scale.atomic import write_bytes_atomic

log = logging.getLogger(__name__)


def _axes(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    write_bytes_atomic(str(path), buffer.getvalue())
    return path


def plot_embedding_pca(features: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], title: str,
                       path: str | Path, max_points: int = 3000, seed: int = 0, dpi: int = 110) -> Path:
    """First two principal components of features [N, D], one colour per class; a seeded subsample of
    `max_points` keeps large cohorts legible. The axis labels give the variance each component explains."""
    rng = np.random.default_rng(seed)
    keep = rng.choice(len(features), size=min(max_points, len(features)), replace=False)
    pca = PCA(n_components=2, random_state=seed)
    xy = pca.fit_transform(features[keep].astype(np.float64))
    fig, ax = _axes(5.5, 4.5)
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for c, name in enumerate(classes):
        m = labels[keep] == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, color=cmap(c % cmap.N), label=f"{name} ({int(m.sum())})")
    ev = pca.explained_variance_ratio_
    ax.set(xlabel=f"PC1 ({ev[0]:.0%} of variance)", ylabel=f"PC2 ({ev[1]:.0%})", title=title)
    ax.legend(markerscale=2, fontsize=8, loc="best")
    return _save(fig, path, dpi)


def plot_roc(y_true: np.ndarray, scores: np.ndarray, classes: tuple[str, ...], title: str, path: str | Path,
             dpi: int = 110) -> Path:
    """One-vs-rest ROC curve per class (one curve for a binary task), AUC in the legend."""
    fig, ax = _axes(5, 4.5)
    targets = [1] if scores.shape[1] == 2 else range(scores.shape[1])
    for c in targets:
        pos = y_true == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, scores[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{classes[c]} (AUC {roc_auc_score(pos, scores[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path, dpi)


def plot_confusion_matrix(cm: np.ndarray, classes: tuple[str, ...] | list[str], title: str, path: str | Path,
                          dpi: int = 110) -> Path:
    """Confusion matrix cm [C, C] (rows true class, columns predicted): each cell shows its count, coloured by its
    share of the row (the recall of the row's class on the diagonal), so rare classes stay readable."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 2.5 + 0.55 * len(classes)
    fig, ax = _axes(size + 1.0, size)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8,
                color="white" if share[i, j] > 0.5 else "black")
    ticks = range(len(classes))
    ax.set_xticks(ticks, [textwrap.fill(str(c), 14) for c in classes], fontsize=8, rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(ticks, [str(c) for c in classes], fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, path, dpi)


def rank_heatmap_figure(ranks: pd.DataFrame, average_rank: pd.Series) -> Figure:
    """The heat-map of `plot_rank_heatmap`, not yet saved. Model names are wrapped at 16 characters; the column
    labels turn vertical when a wrapped line is wider than a column (or past four models), and the figure is
    sized from the number of models (width) and the label length (height), so neighbouring labels never overlap
    however many models are compared or however long their names."""
    models = list(average_rank.index)
    data = ranks[models].to_numpy(dtype=float)
    labels = [f"{textwrap.fill(str(m), 16)}\n(avg {average_rank[m]:.2f})" for m in models]
    widest = max(len(line) for lbl in labels for line in lbl.split("\n"))  # characters
    rotate = len(models) > 4 or widest > 11  # ~0.07 in per 8-pt character vs ~0.8 in of column
    label_height = 0.075 * widest if rotate else 0.16 * max(lbl.count("\n") + 1 for lbl in labels)  # inches
    fig, ax = _axes(2.0 + 0.8 * len(models), 1.2 + 0.45 * len(ranks) + label_height)
    worst = max(len(models), 2)
    im = ax.imshow(data, cmap="YlGn_r", vmin=1, vmax=worst, aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        if np.isfinite(v):
            ax.text(j, i, f"{v:g}", ha="center", va="center", color="white" if v < (1 + worst) / 2 else "black")
    ax.set_xticks(range(len(models)), labels, fontsize=8, rotation=90 if rotate else 0)
    ax.set_yticks(range(len(ranks)), list(ranks.index), fontsize=8)
    ax.set_title("rank per task (1 = best)")
    fig.colorbar(im, ax=ax, fraction=0.05, ticks=range(1, worst + 1))
    return fig


def plot_rank_heatmap(ranks: pd.DataFrame, average_rank: pd.Series, path: str | Path, dpi: int = 110) -> Path:
    """Tasks x models heat-map of ranks (dark green = 1 = best), columns ordered by average rank, shown below."""
    return _save(rank_heatmap_figure(ranks, average_rank), path, dpi)


def split_at_median(risk: np.ndarray) -> np.ndarray:
    """[N] bool, True for the high-risk group: predicted risk strictly above the median."""
    return np.asarray(risk, float) > np.median(risk)


def plot_kaplan_meier(times: np.ndarray, events: np.ndarray, risk: np.ndarray, path: str | Path,
                      title: str = "Kaplan-Meier by predicted risk", dpi: int = 110) -> Path:
    """Kaplan-Meier curves of the low- and high-risk halves (split at the median predicted risk) with the
    log-rank p-value. times [N] (any unit), events [N] (1 = event observed, 0 = censored), risk [N]
    (higher = worse). Uses scikit-survival's estimator and log-rank test (lifelines is not a dependency)."""
    times = np.asarray(times, float)
    events = np.asarray(events).astype(bool)
    high = split_at_median(risk)
    fig, ax = _axes(5.5, 4.2)
    for name, mask, color in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not mask.any():
            log.warning("Kaplan-Meier: the %s group is empty (all risks equal?)", name)
            continue
        t, s = kaplan_meier_estimator(events[mask], times[mask])
        ax.step(np.r_[0, t], np.r_[1, s], where="post", color=color,
                label=f"{name} (n={int(mask.sum())}, events={int(events[mask].sum())})")
        censored = mask & ~events
        at = np.searchsorted(t, times[censored], side="right") - 1
        ax.plot(times[censored], np.where(at >= 0, s[np.maximum(at, 0)], 1.0), "|", color=color, ms=6)
    if high.any() and (~high).any():
        y = np.array(list(zip(events, times, strict=True)), dtype=[("event", bool), ("time", float)])
        _, p = compare_survival(y, high)
        title = f"{title}\nlog-rank p = {p:.3g}"
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)
