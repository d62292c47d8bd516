"""The report: results.json round-trips, report.md names the command and only existing figures; the stage runs
patch tasks end to end on synthetic embeddings, applies --labels, ranks models and dispatches slide tasks."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpfm_scale.contracts.features import write_image_features, write_index, write_slide_features
from gpfm_scale.errors import ConfigError
from gpfm_scale.evaluate import stage
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.metrics import Metric
from gpfm_scale.evaluate.plots import plot_kaplan_meier, split_at_median
from gpfm_scale.evaluate.ranking import summarize_ranks
from gpfm_scale.evaluate.report import ReportInputs, write_report
from gpfm_scale.evaluate.results import TaskResult, read_results_json
from gpfm_scale.evaluate.splits import PatchData

FAST = {"bootstrap": 50, "probe": {"max_epochs": 5}, "few_shot": {"shots": [2], "draws": 3},
        "split": {"group_column": None}}


def _image_embedding(directory: Path, model: str, signal: float, n: int = 90, seed: int = 0) -> Path:
    """n images of 3 classes; features carry the class with strength `signal` (0: pure noise)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 8)) + signal * np.eye(8)[y]
    write_image_features(directory, x, [f"/data/{'abc'[c]}/im{i}.png" for i, c in enumerate(y)], model)
    write_index(directory, [{"slide_id": f"{'abc'[c]}/im{i}.png", "kind": "image", "file": "features/images.h5",
                             "row": i, "n": 1, "label": "abc"[c], "path": f"/data/{'abc'[c]}/im{i}.png"}
                            for i, c in enumerate(y)])
    return directory


def _hand_results() -> tuple[dict[str, dict[str, TaskResult]], dict[str, PatchData]]:
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 10)
    scores = np.eye(3)[y] + rng.uniform(0, 1.2, size=(30, 3))
    probe = TaskResult({"balanced_accuracy": Metric(0.8, 0.7, 0.9), "auc_macro": Metric(float("nan"))},
                       y_true=y, scores=scores / scores.sum(1, keepdims=True), classes=("a", "b", "c"))
    times = rng.uniform(1, 10, 40)
    surv = TaskResult({"c_index": Metric(0.71, 0.6, 0.8)}, times=times, events=rng.integers(0, 2, 40),
                      risk=-times + rng.normal(size=40))
    data = PatchData(rng.normal(size=(30, 5)).astype(np.float32), y, ("a", "b", "c"), np.array(["test"] * 30),
                     np.arange(30).astype(str))
    results = {"m1": {"linear-probe": probe, "survival": surv},
               "m2": {"linear-probe": TaskResult({"balanced_accuracy": Metric(0.6, 0.5, 0.7)})}}
    return results, {"m1": data}


def test_report_files_exist_and_results_round_trip(tmp_path: Path):
    results, embeddings = _hand_results()
    summary = summarize_ranks(pd.DataFrame({"m1": [0.8], "m2": [0.6]}, index=["linear-probe"]))
    cfg = EvaluateConfig(seed=7)
    command = "gpfm-scale evaluate --features a --features b --task linear-probe --out r"
    json_path, md_path, figures = write_report(ReportInputs(results, {"m1": "a", "m2": "b"}, embeddings, summary,
                                                            cfg, command), tmp_path)
    metrics, doc = read_results_json(json_path)
    assert doc["command"] == command and doc["seed"] == 7
    assert doc["config"]["seed"] == 7 and doc["ranking"]["first_places"] == {"m1": 1, "m2": 0}
    assert metrics["m1"]["linear-probe"]["balanced_accuracy"] == Metric(0.8, 0.7, 0.9)
    assert metrics["m1"]["survival"]["c_index"] == Metric(0.71, 0.6, 0.8)
    assert np.isnan(metrics["m1"]["linear-probe"]["auc_macro"].value)  # NaN stored as null, read back as NaN
    md = md_path.read_text()
    assert command in md.split("## Models")[0]
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {Path(p).name for p in linked} == {"ranks.png", "roc_m1_linear-probe.png", "confusion_m1_linear-probe.png",
                                              "km_m1_survival.png", "pca_m1.png"}
    for rel in linked:
        assert (tmp_path / rel).read_bytes()[:4] == b"\x89PNG"
    assert sorted(map(str, figures)) == sorted(str(tmp_path / p) for p in linked)
    assert "| balanced_accuracy | 0.800 [0.700, 0.900] | 0.600 [0.500, 0.700] |" in md


def test_kaplan_meier_split_and_plot(tmp_path: Path):
    risk = np.array([0.1, 0.5, 0.9, 0.3, 0.7])
    np.testing.assert_array_equal(split_at_median(risk), [False, False, True, False, True])
    path = plot_kaplan_meier([5, 3, 1, 4, 2], [1, 0, 1, 1, 1], risk, tmp_path / "km.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_stage_runs_patch_tasks_ranks_models_and_applies_labels(tmp_path: Path):
    good = _image_embedding(tmp_path / "good", "good-model", signal=3.0)
    noise = _image_embedding(tmp_path / "noise", "noise-model", signal=0.0, seed=1)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"file": [f"{'abc'[i % 3]}/im{i}.png" for i in range(90)],  # a and b merge into k0
                  "class": ["k0" if i % 3 < 2 else "k1" for i in range(90)]}).to_csv(labels, index=False)
    cfg = EvaluateConfig.model_validate(FAST)
    res = stage.run(cfg, [str(good), str(noise)], ["knn", "retrieval", "linear-probe", "few-shot"],
                    str(tmp_path / "out"), labels=str(labels), command="gpfm-scale evaluate ...")
    metrics, doc = read_results_json(res.results_json)
    assert set(metrics) == {"good-model", "noise-model"}
    assert metrics["good-model"]["knn"]["balanced_accuracy"].value > 0.8
    assert res.average_rank == {"good-model": 1.0, "noise-model": 2.0}
    assert doc["ranking"]["first_places"]["good-model"] == 4
    assert doc["info"]["good-model"]["linear-probe"]["classes"] == ["k0", "k1"]  # --labels won over the folders
    assert all(Path(f).is_file() for f in res.figures)


def test_stage_rejects_unknown_tasks(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown task"):
        stage.run(EvaluateConfig(), [str(tmp_path)], ["linear_probe"], str(tmp_path / "out"))


def test_stage_dispatches_slide_tasks_with_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    emb = tmp_path / "slides"
    rows = []
    for i in range(4):
        rel = write_slide_features(emb, f"s{i}", np.full((3, 4), i, np.float32), np.zeros((3, 2), np.int64), "tiny")
        rows.append({"slide_id": f"s{i}", "kind": "slide", "file": rel, "row": -1, "n": 3})
    write_index(emb, rows)
    labels = tmp_path / "clinical.csv"
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(4)], "time": [4.0, 3.0, 2.0, 1.0],
                  "event": [1, 0, 1, 1]}).to_csv(labels, index=False)
    seen = {}

    def fake(bags, cfg):
        seen.update(times=[b.row["time"] for b in bags], cfg=type(cfg).__name__)
        return TaskResult({"c_index": Metric(0.75, 0.5, 1.0)}, times=np.array(seen["times"]),
                          events=np.array([1, 0, 1, 1]), risk=-np.array(seen["times"]))

    # a stand-in for the slide-task module: the dispatch contract is tested without training a MIL model
    monkeypatch.setitem(sys.modules, "gpfm_scale.evaluate.slide_tasks",
                        types.SimpleNamespace(run_survival=fake))
    res = stage.run(EvaluateConfig(), [str(emb)], ["survival"], str(tmp_path / "out"), labels=str(labels))
    assert seen == {"times": [4.0, 3.0, 2.0, 1.0], "cfg": "EvaluateConfig"}
    doc = json.loads(Path(res.results_json).read_text())
    assert doc["results"]["tiny"]["survival"]["c_index"] == {"value": 0.75, "ci_low": 0.5, "ci_high": 1.0}
    assert any(Path(f).name == "km_tiny_survival.png" for f in res.figures)
