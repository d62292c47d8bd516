"""The task registry is the one list of evaluation tasks: every entry is dispatched, ranked, drawn and listed in
`gpfm-scale evaluate --help`, and a task registered here (then removed) runs end to end with no other edit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpfm_scale.cli import build_parser, main
from gpfm_scale.contracts.features import write_image_features, write_index
from gpfm_scale.evaluate import stage
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.metrics import Metric
from gpfm_scale.evaluate.report import TASK_PLOTS
from gpfm_scale.evaluate.results import TaskResult
from gpfm_scale.evaluate.splits import PatchData
from gpfm_scale.evaluate.tasks import EVAL_TASKS, EvalTask


def _evaluate_help() -> str:
    sub = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    return " ".join(sub.format_help().split())


def test_every_registered_task_is_dispatched_ranked_drawn_and_listed():
    help_text = _evaluate_help()
    rank_metric = EvaluateConfig().resolved_rank_metric()
    assert len(EVAL_TASKS.names()) == 7
    for name in EVAL_TASKS:
        task = EVAL_TASKS.get(name)
        assert callable(task.load()), name
        assert task.kind in stage._INPUTS, name
        assert rank_metric[name] and "{" not in rank_metric[name], name
        assert set(task.plots) <= set(TASK_PLOTS), name
        assert name in help_text, name


def toy_task(data: PatchData, cfg: EvaluateConfig) -> TaskResult:
    """Nearest class mean of the train rows; accuracy on test, with class shares as ROC scores."""
    (x_tr, y_tr), (x_te, y_te) = data.part("train"), data.part("test")
    means = np.stack([x_tr[y_tr == c].mean(0) for c in range(len(data.classes))])
    dist = ((x_te[:, None] - means[None]) ** 2).sum(-1)
    scores = np.exp(-dist) / np.exp(-dist).sum(1, keepdims=True)
    return TaskResult({"accuracy": Metric(float((dist.argmin(1) == y_te).mean()))}, y_true=y_te, scores=scores,
                      classes=data.classes)


def _images(directory: Path, model: str, signal: float, seed: int) -> str:
    rng = np.random.default_rng(seed)
    y = np.arange(60) % 3
    x = rng.normal(size=(60, 6)) + signal * np.eye(6)[y]
    paths = [f"{'abc'[c]}/im{i}.png" for i, c in enumerate(y)]
    write_image_features(directory, x, paths, model)
    write_index(directory, [{"slide_id": p, "kind": "image", "file": "features/images.h5", "row": i, "n": 1,
                             "label": "abc"[c], "image": p} for i, (p, c) in enumerate(zip(paths, y))])
    return str(directory)


def test_a_registered_task_runs_ranks_plots_and_is_listed_without_other_edits(tmp_path, monkeypatch):
    monkeypatch.setitem(EVAL_TASKS._items, "toy", EvalTask("toy", "patch", f"{__name__}:toy_task", "accuracy",
                                                           ("roc",)))
    assert "toy" in _evaluate_help()
    cfg = EvaluateConfig(split={"group_column": None})
    assert cfg.rank_metric["toy"] == "accuracy"
    dirs = [_images(tmp_path / "good", "good", 3.0, 0), _images(tmp_path / "noise", "noise", 0.0, 1)]
    res = stage.run(cfg, dirs, ["toy"], str(tmp_path / "out"))
    doc = json.loads(Path(res.results_json).read_text())
    assert doc["results"]["good"]["toy"]["accuracy"]["value"] > doc["results"]["noise"]["toy"]["accuracy"]["value"]
    assert res.average_rank == {"good": 1.0, "noise": 2.0}
    assert {Path(f).name for f in res.figures} >= {"roc_good_toy.png", "roc_noise_toy.png"}


def test_rank_metric_keeps_registry_defaults_and_refuses_unknown_tasks(capsys):
    cfg = EvaluateConfig(rank_metric={"knn": "auc_macro"})
    assert cfg.rank_metric["knn"] == "auc_macro" and cfg.rank_metric["survival"] == "c_index"
    assert main(["evaluate", "--set", "rank_metric.segmentation=dice", "--print-config"]) == 2
    assert "no task named ['segmentation']" in capsys.readouterr().err


def test_a_task_name_is_registered_once():
    with pytest.raises(KeyError, match="already registered"):
        EVAL_TASKS.register("knn")(EVAL_TASKS.get("knn"))
