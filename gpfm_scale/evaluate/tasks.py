"""The evaluation tasks, one registry entry each: what a task runs on, how it is ranked, which figures it gets.

Everything about a task lives in its entry, so adding one is its function plus one `register_task` call: the stage
dispatches on `kind`, ranking reads `rank_metric` (the default of `EvaluateConfig.rank_metric`), the report draws
`plots`, and `gpfm-scale evaluate --help` lists the registry. The entry names its function as "module:function"
and `load` imports it when the task runs, so that listing tasks (CLI help, config defaults) imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gpfm_scale.registry import Registry

# What a task runs on: "patch" gets the model's image features as `evaluate.splits.PatchData`, split train/val/test;
# "slide" gets its per-slide bags, `list[contracts.features.Bag]` (each [N, D] tile features).
TaskKind = Literal["patch", "slide"]
TASK_KINDS: tuple[TaskKind, ...] = ("patch", "slide")
# Figures a task's result can feed: "roc" and "confusion" (matrix of the argmax predictions) need y_true [N] and
# scores [N, C], "km" times, events and risk [N].
Plot = Literal["roc", "confusion", "km"]


@dataclass(frozen=True)
class EvalTask:
    """One task: `run(inputs of kind, EvaluateConfig) -> TaskResult | dict[str, Metric]`, metrics on test data."""

    name: str
    kind: TaskKind
    run: str  # "module:function"
    rank_metric: str  # higher is better; "{max_shot}" is filled with max(few_shot.shots)
    plots: tuple[Plot, ...] = ()

    def load(self) -> Callable[[Any, Any], Any]:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


EVAL_TASKS: Registry[EvalTask] = Registry("evaluation task")


def register_task(task: EvalTask) -> EvalTask:
    """Add `task` to EVAL_TASKS (a second task of the same name is refused)."""
    return EVAL_TASKS.register(task.name)(task)


def tasks_help() -> str:
    """The task list of `gpfm-scale evaluate --task`, by kind, from the registry."""
    parts = []
    for kind in TASK_KINDS:
        names = [n for n in EVAL_TASKS.names() if EVAL_TASKS.get(n).kind == kind]
        if names:
            parts.append(f"{kind} tasks: {', '.join(names)}")
    return "; ".join(parts)


def default_rank_metrics() -> dict[str, str]:
    """task -> the metric it is ranked by, as its registry entry says."""
    return {name: EVAL_TASKS.get(name).rank_metric for name in EVAL_TASKS.names()}


_PATCH, _SLIDE = "gpfm_scale.evaluate.patch_tasks", "gpfm_scale.evaluate.slide_tasks"
for _task in (
    EvalTask("linear-probe", "patch", f"{_PATCH}:linear_probe", "balanced_accuracy", ("roc", "confusion")),
    EvalTask("logreg", "patch", f"{_PATCH}:logreg", "balanced_accuracy", ("roc", "confusion")),
    EvalTask("knn", "patch", f"{_PATCH}:knn", "balanced_accuracy", ("confusion",)),
    EvalTask("few-shot", "patch", f"{_PATCH}:few_shot", "balanced_accuracy_{max_shot}shot"),
    EvalTask("retrieval", "patch", f"{_PATCH}:retrieval", "acc_at_1"),
    EvalTask("abmil", "slide", f"{_SLIDE}:run_abmil", "auc_macro", ("roc", "confusion")),
    EvalTask("survival", "slide", f"{_SLIDE}:run_survival", "c_index", ("km",)),
):
    register_task(_task)
