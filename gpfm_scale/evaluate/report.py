"""`DIR/results.json` and `DIR/report.md` (+ `DIR/figures/*.png`): the numbers, their CIs, and how to redo them.

File names come from model and task names (a model name is the `model` attribute of a feature file: data), so
each goes through `slug` and `names.child_path`: one safe component under `figures/`, whatever the name.

The report's header holds the exact command line; with the seed and config stored in results.json it
reproduces every number. Figures come first for a reader who wants the picture: ranks, ROC curves, confusion
matrices, Kaplan-Meier curves, embedding PCA; the tables follow, then per class (confusion matrix, precision,
recall, F1 and support on the test predictions) for each classification task.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpfm_scale.atomic import write_bytes_atomic
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.plots import (plot_confusion_matrix, plot_embedding_pca, plot_kaplan_meier, plot_rank_heatmap,
                                       plot_roc)
from gpfm_scale.evaluate.ranking import RankSummary, rank_markdown
from gpfm_scale.evaluate.results import (RESULTS_FILE, Results, TaskResult, class_report, results_payload,
                                         write_results_json)
from gpfm_scale.evaluate.splits import PatchData
from gpfm_scale.evaluate.tasks import EVAL_TASKS
from gpfm_scale.names import child_path, safe_id

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


@dataclass(frozen=True)
class ReportInputs:
    """Everything a report is made of."""

    results: Results
    sources: dict[str, str]
    embeddings: dict[str, PatchData]
    summary: RankSummary | None
    cfg: EvaluateConfig
    command: str


def slug(name: str) -> str:
    """A file-name-safe form of a model or task name (runs of other characters -> '_'; never empty, '.' or '..',
    never hidden, at most 80 characters so that two fit in one file name)."""
    return safe_id(re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_.")[:80] or "x")


def _figure_path(fig_dir: Path, name: str) -> Path:
    fig_dir.mkdir(parents=True, exist_ok=True)
    return Path(child_path(str(fig_dir), name))


def _draw_confusion(report: dict, title: str, path: Path, dpi: int) -> Path:
    return plot_confusion_matrix(np.asarray(report["confusion_matrix"]), report["classes"], title, path, dpi)


@dataclass(frozen=True)
class TaskPlot:
    """A figure a task's registry entry can ask for (`tasks.Plot`): its report section and how it is drawn."""

    heading: str
    needs: tuple[str, ...]  # TaskResult fields that must be set for the figure
    draw: Callable[[TaskResult, str, Path, int], Path]  # (result, title, path, dpi) -> path


TASK_PLOTS = {
    "roc": TaskPlot("ROC curves (one-vs-rest, test predictions)", ("y_true", "scores"),
                    lambda r, title, path, dpi: plot_roc(r.y_true, r.scores, r.classes, f"{title} (test)", path, dpi)),
    "confusion": TaskPlot(
        "Confusion matrices (test predictions; colour = share of the true class)", ("y_true", "scores"),
        lambda r, title, path, dpi: _draw_confusion(class_report(r), f"{title} (test)", path, dpi)),
    "km": TaskPlot("Kaplan-Meier curves (split at the median predicted risk)", ("times", "events", "risk"),
                   lambda r, title, path, dpi: plot_kaplan_meier(r.times, r.events, r.risk, path, title, dpi)),
}


def _figures(inputs: ReportInputs, out: Path) -> dict[str, list[tuple[str, Path]]]:
    """Section name -> [(caption, path)], each figure written under out/figures/."""
    fig_dir = out / FIGURES_DIR
    dpi = inputs.cfg.report.figure_dpi
    figs: dict[str, list[tuple[str, Path]]] = {"ranks": [], **{p: [] for p in TASK_PLOTS}, "pca": []}
    if inputs.summary is not None and len(inputs.summary.scores):
        figs["ranks"].append(("rank per task", plot_rank_heatmap(
            inputs.summary.ranks, inputs.summary.average_rank, _figure_path(fig_dir, "ranks.png"), dpi)))
    for model, tasks in inputs.results.items():
        for task, res in tasks.items():
            for kind in EVAL_TASKS.get(task).plots:
                plot = TASK_PLOTS[kind]
                if all(getattr(res, field) is not None for field in plot.needs):
                    path = _figure_path(fig_dir, f"{kind}_{slug(model)}_{slug(task)}.png")
                    figs[kind].append((f"{model}: {task}", plot.draw(res, f"{model} - {task}", path, dpi)))
    for model, data in inputs.embeddings.items():
        figs["pca"].append((model, plot_embedding_pca(
            data.features, data.labels, data.classes, f"{model}: PCA of embeddings",
            _figure_path(fig_dir, f"pca_{slug(model)}.png"), inputs.cfg.report.max_points, inputs.cfg.seed, dpi)))
    return figs


def _task_tables(results: Results) -> list[str]:
    """One Markdown table per task: metrics as rows, models as columns, 'value [ci_low, ci_high]'."""
    models = list(results)
    tasks = sorted({t for per_model in results.values() for t in per_model})
    lines = []
    for task in tasks:
        names = list(dict.fromkeys(n for m in models if task in results[m] for n in results[m][task].metrics))
        lines += [f"### {task}", "", "| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for n in names:
            cells = [str(results[m][task].metrics[n]) if task in results[m] and n in results[m][task].metrics
                     else "n/a" for m in models]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _per_class_tables(results: Results) -> list[str]:
    """Per model and classification task: the confusion matrix (rows true, columns predicted) and a table of
    precision, recall, F1 and support per class, from the test predictions (`results.class_report`)."""
    lines = []
    for model, tasks in results.items():
        for task, res in tasks.items():
            rep = class_report(res)
            if rep is None:
                continue
            classes = rep["classes"]
            lines += [f"### {model}: {task}", "", "Confusion matrix (rows: true class, columns: predicted):", "",
                      "| true / predicted | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
            lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |"
                      for c, row in zip(classes, rep["confusion_matrix"], strict=True)]
            lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {c} | {p:.3f} | {r:.3f} | {f:.3f} | {n} |" for c, p, r, f, n in
                      zip(classes, rep["precision"], rep["recall"], rep["f1"], rep["support"], strict=True)]
            lines.append("")
    return lines


def _split_warnings(inputs: ReportInputs) -> list[str]:
    """Report lines for rows or slides split with no case column (`splits.independent_split_warning`, slide
    tasks' `split_warning` info): one per model and input kind, so a reader sees why numbers may be optimistic."""
    lines = [f"- **{model}** (patch tasks): {data.split_warning}" for model, data in inputs.embeddings.items()
             if data.split_warning]
    for model, tasks in inputs.results.items():
        lines += [f"- **{model}** ({task}): {res.info['split_warning']}" for task, res in tasks.items()
                  if res.info.get("split_warning")]
    return lines


def _markdown(inputs: ReportInputs, figs: dict[str, list[tuple[str, Path]]], out: Path) -> str:
    cfg = inputs.cfg
    lines = [
        "# gpfm-scale evaluation report", "",
        "Every number below is reproduced by:", "", "```", inputs.command, "```", "",
        (f"Seed {cfg.seed}; {cfg.ci_level:.0%} intervals are percentile bootstraps of the test set "
         f"({cfg.bootstrap} resamples; AUC resamples missing a class are skipped); few-shot intervals are the spread "
         f"over {cfg.few_shot.draws} support draws. Resolved settings and raw numbers: `{RESULTS_FILE}`."), "",
        "## Models", "", "| model | features |", "|---|---|",
        *[f"| {m} | `{d}` |" for m, d in inputs.sources.items()], "",
    ]
    warnings = _split_warnings(inputs)
    if warnings:
        lines += ["## Warnings", "", *warnings, ""]
    if inputs.summary is not None and len(inputs.summary.scores):
        rank_metric = cfg.resolved_rank_metric()
        metric_of = ", ".join(f"{t}: {rank_metric.get(t)}" for t in inputs.summary.scores.index)
        lines += ["## Ranking", "", f"Ranked by ({metric_of}); ties share the mean rank.", "",
                  rank_markdown(inputs.summary), ""]
    sections = (("ranks", "Ranks"), *((kind, plot.heading) for kind, plot in TASK_PLOTS.items()),
                ("pca", "Embeddings (PCA)"))
    for key, heading in sections:
        if figs[key]:
            lines += [f"## {heading}", ""]
            lines += [f"![{cap}]({p.relative_to(out).as_posix()})" for cap, p in figs[key]] + [""]
    lines += ["## Results per task", "", *_task_tables(inputs.results)]
    per_class = _per_class_tables(inputs.results)
    if per_class:
        lines += ["## Results per class (test predictions)", "", *per_class]
    return "\n".join(lines)


def write_report(inputs: ReportInputs, out: str | Path) -> tuple[Path, Path, list[Path]]:
    """Write results.json, the figures and report.md under `out`; returns (results.json, report.md, figures)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranking = inputs.summary.to_dict() if inputs.summary is not None else None
    payload = results_payload(inputs.results, inputs.cfg.seed, inputs.command, inputs.cfg.model_dump(mode="json"),
                              ranking)
    payload["sources"] = inputs.sources
    json_path = write_results_json(out / RESULTS_FILE, payload)
    figs = _figures(inputs, out)
    md_path = out / REPORT_FILE
    write_bytes_atomic(str(md_path), _markdown(inputs, figs, out).encode())
    figure_paths = [p for section in figs.values() for _, p in section]
    log.info("report: %s (%d figures), %s", md_path, len(figure_paths), json_path)
    return json_path, md_path, figure_paths
