"""The report per class (issue 13.10): confusion matrix and precision/recall/F1/support of the test predictions,
as a figure, as report.md tables and in results.json; rank heat-map labels that do not overlap."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.metrics import Metric, confusion_matrix, per_class_metrics
from gpfm_scale.evaluate.plots import rank_heatmap_figure
from gpfm_scale.evaluate.ranking import summarize_ranks
from gpfm_scale.evaluate.report import ReportInputs, write_report
from gpfm_scale.evaluate.results import TaskResult
from gpfm_scale.evaluate.tasks import EVAL_TASKS


def test_per_class_metrics_match_sklearn_with_a_class_never_predicted():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.uniform(size=200) < 0.6, y, rng.integers(0, 3, 200))
    pred[pred == 3] = 0  # class 3 is never predicted
    cm = confusion_matrix(y, pred, 4)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(y, pred, labels=range(4)))
    ours = per_class_metrics(cm)
    p, r, f, n = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for name, ref in (("precision", p), ("recall", r), ("f1", f), ("support", n)):
        np.testing.assert_allclose(ours[name], ref, err_msg=name)
    assert ours["precision"][3] == 0 and ours["support"][3] > 0


def test_classification_tasks_ask_for_a_confusion_matrix():
    for name in ("linear-probe", "knn", "abmil"):
        assert "confusion" in EVAL_TASKS.get(name).plots, name


def test_report_has_confusion_matrix_and_per_class_table(tmp_path: Path):
    y = np.array([0] * 6 + [1] * 4 + [2] * 5)
    pred = np.array([0, 0, 0, 0, 1, 2] + [1, 1, 1, 0] + [2, 2, 2, 2, 2])
    scores = np.eye(3)[pred] * 0.8 + 0.1
    probe = TaskResult({"balanced_accuracy": Metric(0.8)}, y_true=y, scores=scores,
                       classes=("tumor", "stroma", "immune"))
    results = {"m1": {"linear-probe": probe, "few-shot": TaskResult({"balanced_accuracy_2shot": Metric(0.5)})}}
    inputs = ReportInputs(results, {"m1": "a"}, {}, None, EvaluateConfig(bootstrap=0), "cmd")
    json_path, md_path, _ = write_report(inputs, tmp_path)
    md = md_path.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "figures/confusion_m1_linear-probe.png" in linked
    assert (tmp_path / "figures/confusion_m1_linear-probe.png").read_bytes()[:4] == b"\x89PNG"
    section = md.split("## Results per class (test predictions)")[1]
    assert "### m1: linear-probe" in section and "few-shot" not in section  # no per-sample predictions there
    assert "| tumor | 4 | 1 | 1 |" in section and "| stroma | 1 | 3 | 0 |" in section
    # tumor: precision 4/5, recall 4/6, F1 2*4/(6+5); support 6
    assert "| tumor | 0.800 | 0.667 | 0.727 | 6 |" in section
    per_class = json.loads(json_path.read_text())["per_class"]
    assert list(per_class["m1"]) == ["linear-probe"]
    rep = per_class["m1"]["linear-probe"]
    assert rep["classes"] == ["tumor", "stroma", "immune"]
    assert rep["confusion_matrix"] == [[4, 1, 1], [1, 3, 0], [0, 0, 5]] and rep["support"] == [6, 4, 5]


def _label_boxes(n_models: int, name_len: int) -> tuple[float, list]:
    models = [f"model-{i:02d}-" + "x" * name_len for i in range(n_models)]
    scores = pd.DataFrame(np.random.default_rng(0).uniform(size=(3, n_models)), columns=models,
                          index=["linear-probe", "knn", "abmil"])
    summary = summarize_ranks(scores)
    fig = rank_heatmap_figure(summary.ranks, summary.average_rank)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    renderer = canvas.get_renderer()
    return fig.get_figwidth(), [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]


def test_rank_heatmap_labels_do_not_overlap_and_the_figure_widens_with_models():
    widths = []
    for n_models, name_len in ((3, 2), (6, 20), (12, 30), (20, 12)):
        width, boxes = _label_boxes(n_models, name_len)
        widths.append(width)
        assert len(boxes) == n_models
        for a, b in combinations(boxes, 2):
            assert not a.overlaps(b), (n_models, name_len)
    assert widths == sorted(widths) and widths[-1] > widths[0]
