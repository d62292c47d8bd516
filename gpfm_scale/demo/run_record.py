"""What one demo run made (`DemoRun`) and the three models' results merged across datasets (`Comparison`).

Kept apart from `report.py` and `report_text.py`, which both read these records, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpfm_scale.demo.config import DemoConfig
from gpfm_scale.demo.stages import PretrainOutcome
from gpfm_scale.embed.stage import EmbedResult
from gpfm_scale.evaluate.metrics import Metric
from gpfm_scale.evaluate.ranking import RankSummary, scores_table, summarize_ranks
from gpfm_scale.evaluate.results import read_results_json
from gpfm_scale.evaluate.stage import EvaluateResult
from gpfm_scale.tiling.stage import TilingResult

Table = dict[str, dict[str, dict[str, Metric]]]  # model -> "dataset / task" -> metric name -> Metric


@dataclass(frozen=True)
class DemoRun:
    """Everything the report is made of, keyed as `run_demo` made it (models: trained / random-init / tiny-expert)."""

    cfg: DemoConfig
    out: Path
    tiling: TilingResult
    pretrain: PretrainOutcome
    random_init: Path
    datasets: dict[str, Path]
    embeds: dict[tuple[str, str], EmbedResult]
    evals: dict[str, EvaluateResult]
    times: dict[str, float]
    seconds: float

    def rel(self, path: str | Path) -> str:
        """`path` relative to OUT, as the report links it."""
        return Path(path).resolve().relative_to(self.out).as_posix()

    def model_names(self) -> dict[str, str]:
        """key -> the name `embed` gave the model (the column name of every evaluation table)."""
        return {key: res.model for (_, key), res in self.embeds.items()}


@dataclass(frozen=True)
class Comparison:
    """The evaluation of every dataset merged: metrics per model and entry, each entry's rank metric, the ranks."""

    table: Table
    rank_metric: dict[str, str]
    summary: RankSummary


def compare(run: DemoRun) -> Comparison:
    """Merge each dataset's results.json into one table of "dataset / task" entries and rank the models on it."""
    merged: Table = {}
    rank_metric: dict[str, str] = {}
    for ds, result in run.evals.items():
        metrics, doc = read_results_json(result.results_json)
        for model, tasks in metrics.items():
            for task, values in tasks.items():
                merged.setdefault(model, {})[f"{ds} / {task}"] = values
                rank_metric[f"{ds} / {task}"] = doc["config"]["rank_metric"][task]
    return Comparison(merged, rank_metric, summarize_ranks(scores_table(merged, rank_metric)))
