"""MIL survival: ABMIL attention pooling with a discrete-time hazard head (NLL) or a Cox head, and the c-index.

Conventions (everywhere in this package): `event` = 1 when the death/progression was observed, 0 when the patient
was censored; `censorship` = 1 - event only inside the NLL, where PORPOISE/CLAM-survival write it that way.

- NLL (Zadeh & Schmid 2020, the PORPOISE/MCAT/GPFM `NLLSurvLoss`): time is cut into `num_bins` intervals at the
  quantiles of the *training fold's* uncensored times (the outer edges open, so val/test times outside the training
  range fall in the first/last bin). The head gives per-bin hazards h_k = sigmoid(logit_k), survival
  S_k = prod_{j<=k} (1 - h_j). A patient with an event in bin y contributes -log S_{y-1} - log h_y (S_{-1} = 1);
  a patient censored in bin y contributes -log S_y (it survived bin y, the PORPOISE convention). `alpha` > 0 adds
  alpha x the uncensored term again. Risk for the c-index = -sum_k S_k (as PORPOISE/GPFM): lower expected survival,
  higher risk.
- Cox: the head gives a log-risk eta per bag; the loss is minus the Breslow partial log-likelihood per event,
  -(1/E) sum_{i: event} [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)] (tied times share one risk set). It needs
  several bags per step (`cox_batch_size`); a batch without any event is skipped. Risk = eta.
- c-index: Harrell's, from `sksurv.metrics.concordance_index_censored(event, time, risk)` (tied risks count 1/2).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from gpfm_scale.errors import GpfmError
from gpfm_scale.evaluate.abmil import (
    ABMIL,
    BagSet,
    FitLog,
    Objective,
    Targets,
    fit_mil,
    predict_outputs,
    resolve_device,
)
from gpfm_scale.evaluate.slide_config import MilModelConfig, MilTrainConfig, SurvivalConfig
from gpfm_scale.extras import require

log = logging.getLogger(__name__)

EPS = 1e-7


def survival_from_hazards(hazards: torch.Tensor) -> torch.Tensor:
    """Per-bin hazards [B, K] in (0, 1) -> survival S_k = P(T beyond bin k) [B, K]."""
    return torch.cumprod(1.0 - hazards, dim=1)


def nll_hazard_loss(hazards: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Discrete-time hazard NLL, mean over the batch. hazards [B, K], bins [B] long in 0..K-1, events [B] in {0, 1}."""
    events = events.float().view(-1, 1)
    bins = bins.long().view(-1, 1)
    surv_padded = torch.cat([torch.ones_like(events), survival_from_hazards(hazards)], dim=1)
    uncensored = -events * (torch.gather(surv_padded, 1, bins).clamp(min=EPS).log()
                            + torch.gather(hazards, 1, bins).clamp(min=EPS).log())
    censored = -(1.0 - events) * torch.gather(surv_padded, 1, bins + 1).clamp(min=EPS).log()
    return ((1.0 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def cox_partial_loss(risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor | None:
    """Minus the Breslow partial log-likelihood per event; risk [B] log-hazards, times [B], events [B] in {0, 1}.

    Returns None when the batch has no event (the likelihood is empty: nothing to learn from it).
    """
    events = events.float().view(-1)
    num_events = events.sum()
    if num_events.item() == 0:
        return None
    risk = risk.view(-1)
    at_risk = times.view(1, -1) >= times.view(-1, 1)
    log_denominator = torch.logsumexp(risk.view(1, -1).expand(len(risk), -1).masked_fill(~at_risk, float("-inf")),
                                      dim=1)
    return -((risk - log_denominator) * events).sum() / num_events


def quantile_bin_edges(times: np.ndarray, events: np.ndarray, num_bins: int) -> np.ndarray:
    """Interior edges [num_bins - 1] at the quantiles of the uncensored times (PORPOISE bins the same way)."""
    observed = np.asarray(times, dtype=np.float64)[np.asarray(events, dtype=bool)]
    if len(observed) < num_bins:
        raise GpfmError(f"{len(observed)} observed events in the training fold: too few for {num_bins} time bins")
    return np.quantile(observed, np.linspace(0, 1, num_bins + 1)[1:-1])


def assign_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index in 0..len(edges) per time; bins are [edge_{k-1}, edge_k), the outer two open-ended."""
    return np.searchsorted(edges, np.asarray(times, dtype=np.float64), side="right")


def risk_from_outputs(outputs: torch.Tensor, loss: str) -> np.ndarray:
    """Model outputs [n, K] -> risk [n] (higher = earlier event): -sum_k S_k for the NLL head, eta for Cox."""
    if loss == "cox":
        return outputs[:, 0].double().numpy()
    return (-survival_from_hazards(torch.sigmoid(outputs.double())).sum(dim=1)).numpy()


def concordance_index(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index of `risk` (higher = earlier event); NaN when no pair is comparable (e.g. no event)."""
    sksurv_metrics = require("sksurv.metrics", "survival", "the survival c-index")
    sksurv_exceptions = require("sksurv.exceptions", "survival", "the survival c-index")
    events = np.asarray(events, dtype=bool)
    if len(events) < 2 or not events.any():
        return float("nan")
    try:
        return float(sksurv_metrics.concordance_index_censored(events, np.asarray(times, dtype=np.float64),
                                                               np.asarray(risk, dtype=np.float64))[0])
    except sksurv_exceptions.NoComparablePairException:
        return float("nan")


def survival_objective(cfg: SurvivalConfig, train_cfg: MilTrainConfig) -> Objective:
    def loss(out: torch.Tensor, t: Targets) -> torch.Tensor | None:
        if cfg.loss == "cox":
            return cox_partial_loss(out[:, 0], t["time"], t["event"])
        return nll_hazard_loss(torch.sigmoid(out), t["bin"], t["event"], cfg.nll_alpha)

    def metric(out: torch.Tensor, t: Targets) -> float:
        return concordance_index(t["time"].numpy(), t["event"].numpy(), risk_from_outputs(out.detach(), cfg.loss))

    batch_size = train_cfg.cox_batch_size if cfg.loss == "cox" else train_cfg.batch_size
    return Objective(loss, metric, batch_size)


def _targets(times: np.ndarray, events: np.ndarray, edges: np.ndarray | None) -> Targets:
    out = {"time": torch.as_tensor(times, dtype=torch.float64),
           "event": torch.as_tensor(np.asarray(events, dtype=np.float32))}
    if edges is not None:
        out["bin"] = torch.as_tensor(assign_bins(times, edges), dtype=torch.long)
    return out


def fit_survival(train: tuple[list[np.ndarray], np.ndarray, np.ndarray],
                 val: tuple[list[np.ndarray], np.ndarray, np.ndarray], model_cfg: MilModelConfig,
                 train_cfg: MilTrainConfig, cfg: SurvivalConfig, seed: int) -> tuple[ABMIL, FitLog, np.ndarray | None]:
    """Train a MIL survival model on (bags, times [n], events [n]); returns it, its log and the NLL bin edges."""
    require("sksurv", "survival", "the survival task")  # before training, not at its c-index
    feats, times, events = train
    if not np.asarray(events, dtype=bool).any():
        raise GpfmError("the training split has no observed event: a survival model cannot be fitted")
    edges = quantile_bin_edges(times, events, cfg.num_bins) if cfg.loss == "nll" else None
    torch.manual_seed(seed)
    model = ABMIL(feats[0].shape[1], cfg.num_bins if cfg.loss == "nll" else 1, model_cfg)
    train_set = BagSet(feats, _targets(times, events, edges))
    val_set = BagSet(val[0], _targets(val[1], val[2], edges))
    fit = fit_mil(model, survival_objective(cfg, train_cfg), train_set, val_set, train_cfg, seed)
    return model, fit, edges


def predict_risk(model: ABMIL, features: list[np.ndarray], loss: str, device: str = "auto") -> np.ndarray:
    """Risk [n] (higher = earlier event) for bags of [N_i, D] tiles."""
    return risk_from_outputs(predict_outputs(model, features, resolve_device(device)), loss)
