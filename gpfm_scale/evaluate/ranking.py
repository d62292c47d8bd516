"""Model ranking across tasks, as the GPFM article reports it (average rank 1.36, first on 29 of 39 tasks).

Per task, models are ranked on that task's metric: 1 = best, tied models share the mean of the ranks they
span (two models tied for best both get 1.5). A model's average rank is the mean over the tasks it was
evaluated on. A model takes a first place on a task when no model scores strictly better (ties for the top
all count, so first places can sum to more than the number of tasks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from gpfm_scale.evaluate.metrics import Metric

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSummary:
    """scores / ranks: [tasks x models] (NaN where a model lacks a task); per-model series sorted by average rank."""

    scores: pd.DataFrame
    ranks: pd.DataFrame
    average_rank: pd.Series
    first_places: pd.Series

    def to_dict(self) -> dict[str, Any]:
        def clean(frame: pd.DataFrame) -> dict[str, dict[str, float | None]]:
            return {task: {m: (None if pd.isna(v) else float(v)) for m, v in row.items()}
                    for task, row in frame.iterrows()}

        return {"scores": clean(self.scores), "ranks": clean(self.ranks),
                "average_rank": {m: float(v) for m, v in self.average_rank.items()},
                "first_places": {m: int(v) for m, v in self.first_places.items()},
                "num_tasks": len(self.scores)}


def rank_models(scores: pd.DataFrame, higher_is_better: bool = True) -> pd.DataFrame:
    """[tasks x models] scores -> ranks per task (1 = best, ties averaged, NaN stays NaN)."""
    return scores.rank(axis=1, method="average", ascending=not higher_is_better, na_option="keep")


def summarize_ranks(scores: pd.DataFrame, higher_is_better: bool = True) -> RankSummary:
    """Ranks, average rank and first-place count per model (definitions in the module docstring)."""
    ranks = rank_models(scores, higher_is_better)
    best = scores.rank(axis=1, method="min", ascending=not higher_is_better, na_option="keep")
    average = ranks.mean(axis=0, skipna=True)
    firsts = (best == 1).sum(axis=0).astype(int)
    order = sorted(scores.columns, key=lambda m: (average[m], -firsts[m], str(m)))
    return RankSummary(scores, ranks, average[order], firsts[order])


def scores_table(results: Mapping[str, Mapping[str, Mapping[str, Metric]]],
                 rank_metric: Mapping[str, str]) -> pd.DataFrame:
    """[tasks x models] of each task's ranking metric from model -> task -> metric name -> Metric.

    Tasks whose ranking metric is missing for every model are left out (with a warning naming the metric).
    """
    models = list(results)
    tasks = sorted({t for per_model in results.values() for t in per_model})
    rows = {}
    for task in tasks:
        name = rank_metric.get(task)
        values = {m: results[m].get(task, {}).get(name) if name else None for m in models}
        if all(v is None for v in values.values()):
            log.warning("ranking: task %r has no metric %r (set rank_metric.%s); left out", task, name, task)
            continue
        rows[task] = {m: (np.nan if v is None else v.value) for m, v in values.items()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=models)


def rank_markdown(summary: RankSummary) -> str:
    """Markdown: one row per task with 'score (rank)' per model, then average rank and first places."""
    models = list(summary.average_rank.index)
    lines = ["| task | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for task in summary.scores.index:
        cells = []
        for m in models:
            s, r = summary.scores.at[task, m], summary.ranks.at[task, m]
            cells.append("n/a" if pd.isna(s) else f"{s:.3f} ({r:g})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **average rank** | " + " | ".join(f"**{summary.average_rank[m]:.2f}**" for m in models) + " |")
    lines.append("| **first places** | " + " | ".join(
        f"**{summary.first_places[m]} of {int(summary.scores[m].notna().sum())}**" for m in models) + " |")
    return "\n".join(lines)
