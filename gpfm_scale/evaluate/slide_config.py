"""Settings of the slide-level tasks (ABMIL classification and MIL survival); `EvaluateConfig` nests this.

Defaults follow REFERENCE.md "Downstream protocols" and the CLAM/GPFM trainers it describes: ABMIL with a 512-wide
first layer, tanh attention with 128 hidden units, dropout 0.25; Adam lr 2e-4, weight decay 1e-4; early stopping
with patience 20 after at least 50 epochs (the CLAM/GPFM `EarlyStopping(patience=20, stop_epoch=50)`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpfm_scale.config import StrictModel


class MilModelConfig(StrictModel):
    """The attention-MIL network shared by classification and survival."""

    hidden_dim: int = Field(512, ge=1, description="width of the per-tile Linear(D -> hidden) + ReLU layer")
    attention_dim: int = Field(128, ge=1, description="hidden units of the attention network")
    attention: Literal["tanh", "gated"] = Field("tanh", description="ABMIL attention: tanh (reference) or gated")
    dropout: float = Field(0.25, ge=0.0, lt=1.0, description="dropout after the first layer and in the attention")


class MilTrainConfig(StrictModel):
    """Optimisation and early stopping of one fold."""

    lr: float = Field(2e-4, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="Adam (L2) weight decay")
    max_epochs: int = Field(200, ge=1, description="upper bound on epochs per fold")
    min_epochs: int = Field(50, ge=0, description="no early stop before this epoch (CLAM's stop_epoch)")
    patience: int = Field(20, ge=1, description="epochs without a better validation score before stopping")
    early_stop_on: Literal["loss", "metric"] = Field(
        "loss", description="validation quantity that picks the kept weights: loss (CLAM) or metric (AUC/c-index)")
    batch_size: int = Field(1, ge=1, description="bags per optimiser step (1 as CLAM; padded and masked when > 1)")
    cox_batch_size: int = Field(32, ge=2, description="bags per step for the Cox loss, which needs a risk set")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")


class SurvivalConfig(StrictModel):
    """Survival targets, loss and the censoring-convention check (see `evaluate/censoring.py`)."""

    loss: Literal["nll", "cox"] = Field("nll", description="discrete-time hazard NLL or Cox partial likelihood")
    num_bins: int = Field(4, ge=2, description="NLL time bins: quantiles of the training fold's uncensored times")
    nll_alpha: float = Field(0.0, ge=0.0, le=1.0,
                             description="PORPOISE alpha: extra weight on the uncensored term (0 = plain NLL)")
    unit: Literal["case", "slide"] = Field(
        "case", description="case: the slides of a case are pooled into one bag (one patient, one c-index entry)")
    time_column: str = Field("time", description="follow-up time column (any unit, >= 0)")
    event_column: str = Field("event", description="1 = death/progression observed, 0 = censored")
    censorship_column: str | None = Field(
        None, description="use this column instead, with the opposite meaning (1 = censored), converted explicitly")
    censoring_check: Literal["error", "warn"] = Field(
        "error", description="what a likely flipped event column does: refuse the task, or log a warning")
    flip_threshold: float = Field(
        0.65, gt=0.5, le=1.0, description="P(event time > censored time) at or above which events look flipped")
    min_each: int = Field(10, ge=1, description="events and censored cases needed before the flip test is run")


class SlideTaskConfig(StrictModel):
    """What only the slide tasks use: folds, the label column, the MIL network, training and survival.

    The seed, the bootstrap count, the CI level and the split/case columns are `EvaluateConfig`'s (`seed`,
    `bootstrap`, `ci_level`, `split.split_column`, `split.group_column`): one value for patch and slide tasks.
    """

    num_folds: int = Field(5, ge=3, description="k-fold by case when there is no split column (test i, val i+1)")
    label_column: str = Field("label", description="class label column for ABMIL")
    model: MilModelConfig = MilModelConfig()
    train: MilTrainConfig = MilTrainConfig()
    survival: SurvivalConfig = SurvivalConfig()
