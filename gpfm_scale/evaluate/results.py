"""What one task returns, and `results.json`: per model and task, metric name -> {value, ci_low, ci_high}.

`TaskResult` is also the richer return type a slide task may give instead of a plain `dict[str, Metric]`:
test labels and class scores feed the ROC figure, the confusion matrix and the per-class table (`class_report`,
also stored in results.json under "per_class"), survival times/events/risk the Kaplan-Meier figure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_scale.atomic import write_bytes_atomic
from gpfm_scale.evaluate.metrics import Metric, confusion_matrix, per_class_metrics

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class TaskResult:
    """Metrics of one model on one task, plus what its figures need (all optional)."""

    metrics: dict[str, Metric]
    y_true: np.ndarray | None = None
    scores: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    times: np.ndarray | None = None
    events: np.ndarray | None = None
    risk: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def as_task_result(value: Any) -> TaskResult:
    """Accept a TaskResult or a plain mapping of metric name -> Metric (the slide tasks' contract)."""
    if isinstance(value, TaskResult):
        return value
    if isinstance(value, Mapping):
        return TaskResult({str(k): v if isinstance(v, Metric) else Metric(float(v)) for k, v in value.items()})
    raise TypeError(f"a task returned {type(value).__name__}; expected TaskResult or dict[str, Metric]")


Results = dict[str, dict[str, TaskResult]]


def class_report(res: TaskResult) -> dict[str, Any] | None:
    """The test predictions of a classification result (prediction = argmax of scores [N, C]) as the confusion
    matrix [C, C] (rows true class, columns predicted) and per-class precision, recall, F1 and support, JSON-ready;
    None for a result without per-sample labels and scores (few-shot, retrieval, survival)."""
    if res.y_true is None or res.scores is None:
        return None
    num_classes = res.scores.shape[1]
    cm = confusion_matrix(res.y_true, np.asarray(res.scores).argmax(1), num_classes)
    per_class = per_class_metrics(cm)
    classes = list(res.classes) if len(res.classes) == num_classes else [str(c) for c in range(num_classes)]
    return {"classes": classes, "confusion_matrix": cm.tolist(),
            **{name: values.tolist() for name, values in per_class.items()}}


def results_payload(results: Results, seed: int, command: str, config: dict[str, Any],
                    ranking: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON document: every number with its CI, and how to reproduce it."""
    return {
        "command": command,
        "seed": seed,
        "config": config,
        "results": {model: {task: {name: m.to_dict() for name, m in res.metrics.items()}
                            for task, res in tasks.items()} for model, tasks in results.items()},
        "info": {model: {task: _info(res) for task, res in tasks.items() if _info(res)}
                 for model, tasks in results.items()},
        "per_class": {model: {task: class_report(res) for task, res in tasks.items() if class_report(res)}
                      for model, tasks in results.items()},
        "ranking": ranking,
    }


def _info(res: TaskResult) -> dict[str, Any]:
    """A task's extra record (epochs, folds...) plus its class names when it has classes."""
    return {**({"classes": list(res.classes)} if res.classes else {}), **res.info}


def write_results_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomic write; NaN is refused (not JSON): a metric that cannot be computed must be None upstream."""
    path = Path(path)
    write_bytes_atomic(str(path), json.dumps(payload, indent=2, allow_nan=False, default=_plain).encode())
    return path


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def read_results_json(path: str | Path) -> tuple[dict[str, dict[str, dict[str, Metric]]], dict[str, Any]]:
    """(model -> task -> metric name -> Metric, the whole document)."""
    doc = json.loads(Path(path).read_text())
    metrics = {model: {task: {name: Metric.from_dict(m) for name, m in ms.items()} for task, ms in tasks.items()}
               for model, tasks in doc["results"].items()}
    return metrics, doc
