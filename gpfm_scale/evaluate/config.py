"""Every setting of `gpfm-scale evaluate`, with the protocol defaults of REFERENCE.md "Downstream protocols".

Every task receives this one object. Each value is owned once: the seed, the bootstrap count, the CI level and
the split/case columns (`split.split_column`, `split.group_column`) serve patch and slide tasks alike; `slide`
(`SlideTaskConfig`) holds only what ABMIL and survival alone use. The keys the slide section had before
(`slide.seed`, `slide.num_bootstrap`, `slide.ci_level`, `slide.case_column`, `slide.split_column`) are refused with
the key that replaces them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from gpfm_scale.config import StrictModel
from gpfm_scale.evaluate.slide_config import SlideTaskConfig
from gpfm_scale.evaluate.tasks import EVAL_TASKS, default_rank_metrics


class SplitConfig(StrictModel):
    """How rows are split: fractions for the patch tasks (the slide tasks use k folds); both columns for both."""

    train: float = Field(0.7, gt=0, lt=1, description="fraction of samples (or groups) for training (GPFM 7:1:2)")
    val: float = Field(0.1, ge=0, lt=1, description="fraction for validation (linear-probe early stopping)")
    test: float = Field(0.2, gt=0, lt=1, description="fraction held out for every reported number")
    split_column: str = Field("split", description="index column with train/val/test per row (image or slide); "
                              "used when every row has it")
    group_column: str | None = Field(
        "case_id", description="rows sharing this column's value stay in one split or fold (correlated crops: "
        "case_id, source image; slides of one patient); patch rows are grouped only when every row has a value, a "
        "slide without one is its own case; null: split rows independently")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got train {self.train} + val {self.val} "
                              f"+ test {self.test}")
        return self


class ProbeConfig(StrictModel):
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate (cosine decay to 0 over max_epochs)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    batch_size: int = Field(256, ge=1, description="training batch size")
    max_epochs: int = Field(100, ge=1, description="upper bound on epochs; the cosine schedule spans them")
    patience: int = Field(10, ge=1, description="epochs without a better validation macro-AUC before stopping")
    num_threads: int | None = Field(
        1, ge=1, description="torch CPU threads while the probe trains (a [D -> C] model: thread hand-offs cost more "
        "than they save; measured 18x faster with 1 than 2 on a busy 2-core machine); null: leave torch's setting")


class LogRegConfig(StrictModel):
    """The `logreg` task: scikit-learn's L-BFGS logistic regression, UNI's protocol (module `patch_tasks.logreg`)."""

    max_iter: int = Field(1000, ge=1, description="L-BFGS iterations (UNI/CLIP: 1000)")
    C: float | None = Field(None, gt=0, description="inverse L2 strength; null: UNI's C = D * num_classes / 100 "
                            "(lambda = 100 / (D * num_classes), D the feature dimension)")


class KnnConfig(StrictModel):
    k: int = Field(20, ge=1, description="neighbours voting (DINO kNN: cosine similarity)")
    temperature: float = Field(0.07, gt=0, description="vote weight exp(similarity / T)")


class FewShotConfig(StrictModel):
    shots: list[int] = Field([1, 2, 4, 8, 16], description="examples per class in each draw")
    draws: int = Field(100, ge=1, description="random support sets drawn per shot count")


class RetrievalConfig(StrictModel):
    top_k: list[int] = Field([1, 3, 5], description="Acc@K reported for these K")
    majority_k: int = Field(5, ge=1, description="K of MVAcc@K (majority vote of the K nearest)")


class ReportConfig(StrictModel):
    max_points: int = Field(3000, ge=10, description="embedding points drawn per PCA scatter (a seeded subsample)")
    figure_dpi: int = Field(110, ge=50, description="resolution of the PNG figures")


# Keys the slide section used to hold -> the one key that owns each value now.
_MOVED_SLIDE_KEYS = {"seed": "seed", "num_bootstrap": "bootstrap", "ci_level": "ci_level",
                     "case_column": "split.group_column", "split_column": "split.split_column"}


class EvaluateConfig(StrictModel):
    seed: int = Field(0, description="one seed for splits and folds, probe and MIL init/shuffling, few-shot draws "
                      "and bootstrap (patch and slide tasks)")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the CIs: of the test set (patch tasks), "
                           "of the fold mean (slide tasks); 0: none")
    ci_level: float = Field(0.95, gt=0, lt=1, description="confidence level of the percentile intervals")
    split: SplitConfig = SplitConfig()
    probe: ProbeConfig = ProbeConfig()
    logreg: LogRegConfig = LogRegConfig()
    knn: KnnConfig = KnnConfig()
    few_shot: FewShotConfig = FewShotConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    report: ReportConfig = ReportConfig()
    slide: SlideTaskConfig = Field(SlideTaskConfig(), description="ABMIL and survival settings (slide_config.py)")
    rank_metric: dict[str, str] = Field(
        default_factory=default_rank_metrics, description="the metric each task is ranked by (higher is better); "
        "{max_shot}: max(few_shot.shots); a task not named keeps its registry default (evaluate/tasks.py)")

    @field_validator("rank_metric")
    @classmethod
    def _rank_metric_of_known_tasks(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(EVAL_TASKS.names()))
        if unknown:
            raise ValueError(f"no task named {unknown}; tasks: {', '.join(EVAL_TASKS.names())}")
        return {**default_rank_metrics(), **value}

    @model_validator(mode="before")
    @classmethod
    def _refuse_moved_slide_keys(cls, data: Any) -> Any:
        """An old config's `slide.num_bootstrap` etc. would otherwise be "unknown key" with no hint where it went."""
        slide = data.get("slide") if isinstance(data, dict) else None
        moved = [k for k in _MOVED_SLIDE_KEYS if isinstance(slide, dict) and k in slide]
        if moved:
            raise ValueError("; ".join(f"slide.{k} is now {_MOVED_SLIDE_KEYS[k]} (one value for patch and slide "
                                       f"tasks)" for k in moved))
        return data

    def resolved_rank_metric(self) -> dict[str, str]:
        """rank_metric with {max_shot} filled in: the metric name each task is ranked by in this run."""
        shot = str(max(self.few_shot.shots, default=0))
        return {task: name.replace("{max_shot}", shot) for task, name in self.rank_metric.items()}
