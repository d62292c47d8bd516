"""Stage 4 entry: `run(cfg, features_dirs, tasks, out, labels, command) -> EvaluateResult`.

One embedding directory per model (`gpfm-scale embed` output). Each task is an entry of `evaluate/tasks.py`
EVAL_TASKS: a patch task runs on the model's image features, a slide task on its per-slide bags, each read once per
model when some task asked for it (`_INPUTS`). With two or more models the tasks are ranked; the report and
results.json are written under `out`, which the run holds (`run_lock.OutputLock`) from before it reads anything to
its end. Non-finite features (NaN/inf) are refused when read (GpfmError naming the files, exit 2): every metric
computed on them would be NaN or a crash.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from gpfm_scale.contracts.features import Bag, check_finite_bags, iter_slide_bags, load_image_features, model_name
from gpfm_scale.errors import ConfigError, GpfmError
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.ranking import RankSummary, scores_table, summarize_ranks
from gpfm_scale.evaluate.report import ReportInputs, write_report
from gpfm_scale.evaluate.results import Results, TaskResult, as_task_result
from gpfm_scale.evaluate.splits import PatchData, apply_label_table, prepare_patch_data, read_label_table
from gpfm_scale.evaluate.tasks import EVAL_TASKS, EvalTask
from gpfm_scale.run_lock import OutputLock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    """Where the outputs are and what was evaluated."""

    out: str
    results_json: str
    report_md: str
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    figures: tuple[str, ...]
    average_rank: dict[str, float] | None


def _check_tasks(tasks: list[str]) -> list[str]:
    if not tasks:
        raise ConfigError(f"no task given; choose from {', '.join(EVAL_TASKS.names())}")
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; choose from {', '.join(EVAL_TASKS.names())}")
    return list(dict.fromkeys(tasks))


def _model_names(features_dirs: list[str]) -> list[str]:
    """The model name of each directory; repeated names get the directory name appended to stay distinct."""
    names = [model_name(d) for d in features_dirs]
    counts = Counter(names)
    return [f"{n} ({Path(d).name})" if counts[n] > 1 else n for n, d in zip(names, features_dirs, strict=True)]


def _patch_data(directory: str, labels: pd.DataFrame | None, cfg: EvaluateConfig) -> PatchData:
    features, index = load_image_features(directory)
    if labels is not None:
        index = apply_label_table(index, labels)
    return prepare_patch_data(features, index, cfg.split, cfg.seed)


def _bags(directory: str, labels: pd.DataFrame | None) -> list[Bag]:
    bags = list(iter_slide_bags(directory))
    if not bags:
        raise GpfmError(f"{directory}: no slide features (slide tasks need a slide embedding)")
    check_finite_bags(directory, bags)
    if labels is None:
        return bags
    index = apply_label_table(pd.DataFrame([b.row for b in bags]), labels)
    return [dataclasses.replace(b, row=row) for b, row in zip(bags, index.to_dict("records"), strict=True)]


# What each task kind (tasks.TaskKind) runs on, read from one embedding directory.
_INPUTS = {"patch": _patch_data, "slide": lambda directory, labels, _cfg: _bags(directory, labels)}


def _evaluate_model(directory: str, tasks: list[EvalTask], labels: pd.DataFrame | None,
                    cfg: EvaluateConfig) -> tuple[dict[str, TaskResult], PatchData | None]:
    inputs = {kind: _INPUTS[kind](directory, labels, cfg) for kind in dict.fromkeys(t.kind for t in tasks)}
    out: dict[str, TaskResult] = {}
    for task in tasks:
        start = time.perf_counter()
        out[task.name] = as_task_result(task.load()(inputs[task.kind], cfg))
        log.info("%s on %s: %.1f s", task.name, directory, time.perf_counter() - start)
    return out, inputs.get("patch")


def _check_paired(embeddings: dict[str, PatchData]) -> None:
    """Ranks compare models on the same test images; warn when the test sets differ."""
    test_sets = {m: frozenset(d.ids[d.split == "test"]) for m, d in embeddings.items()}
    if len(set(test_sets.values())) > 1:
        log.warning("models were tested on different images (their embedding dirs hold different samples): "
                    "ranks are not a paired comparison")


def _rank(results: Results, cfg: EvaluateConfig) -> RankSummary | None:
    if len(results) < 2:
        return None
    metrics = {m: {t: r.metrics for t, r in tasks.items()} for m, tasks in results.items()}
    table = scores_table(metrics, cfg.resolved_rank_metric())
    return summarize_ranks(table) if len(table) else None


def run(cfg: EvaluateConfig, features_dirs: list[str], tasks: list[str], out: str, labels: str | None = None,
        command: str = "") -> EvaluateResult:
    """Evaluate every model (one embedding dir each) on every task, rank them, write the report under `out`."""
    tasks = _check_tasks(tasks)
    if not features_dirs:
        raise ConfigError("no --features directory given")
    with OutputLock(str(out), "evaluate"):
        return _run(cfg, features_dirs, tasks, out, labels, command)


def _run(cfg: EvaluateConfig, features_dirs: list[str], tasks: list[str], out: str, labels: str | None,
         command: str) -> EvaluateResult:
    label_table = read_label_table(labels) if labels else None
    names = _model_names(features_dirs)
    results: Results = {}
    embeddings: dict[str, PatchData] = {}
    for name, directory in zip(names, features_dirs, strict=True):
        log.info("evaluating %s (%s) on %s", name, directory, ", ".join(tasks))
        results[name], data = _evaluate_model(directory, [EVAL_TASKS.get(t) for t in tasks], label_table, cfg)
        if data is not None:
            embeddings[name] = data
    _check_paired(embeddings)
    summary = _rank(results, cfg)
    inputs = ReportInputs(results, dict(zip(names, map(str, features_dirs), strict=True)), embeddings, summary, cfg,
                          command)
    json_path, md_path, figures = write_report(inputs, out)
    return EvaluateResult(str(out), str(json_path), str(md_path), tuple(names), tuple(tasks),
                          tuple(map(str, figures)), None if summary is None else summary.average_rank.to_dict())
