"""Attention-based MIL (ABMIL, Ilse et al. 2018, as CLAM/GPFM run it) and the fold training loop it shares with survival.

A slide is a bag of N tile features [N, D]. Each tile goes through Linear(D -> 512) + ReLU + dropout 0.25; a tanh
(or gated) attention network with 128 hidden units scores each tile; a softmax over the bag's tiles weights them into
one slide vector [512]; a linear head classifies it. Bags of different N are batched by zero-padding to the longest
and masking the padded tiles out of the softmax, so a padded batch gives exactly the per-bag results.

Training (`fit_mil`): Adam (lr 2e-4, weight decay 1e-4), class-balanced sampling with replacement (CLAM's
WeightedRandomSampler), validation after every epoch, the weights of the best validation epoch kept (validation
loss by default, as CLAM/GPFM; AUC or c-index with `early_stop_on="metric"`), stop after `patience` epochs without
improvement once `min_epochs` have passed. Everything random draws from the fold's seed, so a CPU run repeats
bit for bit.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpfm_scale.evaluate import metrics
from gpfm_scale.evaluate.slide_config import MilModelConfig, MilTrainConfig

log = logging.getLogger(__name__)

Targets = dict[str, torch.Tensor]


class AttentionPool(nn.Module):
    """Tiles [B, N, D] (+ mask [B, N], True = real tile) -> slide vectors [B, H] and attention [B, N] (rows sum to 1)."""

    def __init__(self, in_dim: int, cfg: MilModelConfig) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attn_a = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.attention_dim), nn.Tanh(), nn.Dropout(cfg.dropout))
        self.attn_b = (nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.attention_dim), nn.Sigmoid(),
                                     nn.Dropout(cfg.dropout)) if cfg.attention == "gated" else None)
        self.attn_w = nn.Linear(cfg.attention_dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(x)
        a = self.attn_a(h)
        if self.attn_b is not None:
            a = a * self.attn_b(h)
        scores = self.attn_w(a).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        return torch.einsum("bn,bnh->bh", attention, h), attention


class ABMIL(nn.Module):
    """Attention pooling + linear classifier: tiles [B, N, D] -> class logits [B, C] (and attention [B, N])."""

    def __init__(self, in_dim: int, num_outputs: int, cfg: MilModelConfig) -> None:
        super().__init__()
        self.pool = AttentionPool(in_dim, cfg)
        self.head = nn.Linear(cfg.hidden_dim, num_outputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        slide, attention = self.pool(x, mask)
        return self.head(slide), attention


@dataclass
class BagSet:
    """The bags of one split: `features[i]` is [N_i, D] float32; `targets[k]` has one row per bag.

    `sampling_weights` (one per bag, any scale) makes training draw bags with replacement in proportion to them.
    """

    features: list[np.ndarray]
    targets: Targets
    sampling_weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.features)


@dataclass(frozen=True)
class Objective:
    """What a task trains and selects on. `loss` returns None when a batch carries no signal (Cox: no event)."""

    loss: Callable[[torch.Tensor, Targets], torch.Tensor | None]
    metric: Callable[[torch.Tensor, Targets], float]
    batch_size: int


@dataclass
class FitLog:
    """How a fold's training went: epochs run, the kept epoch (1-based, 0 = none) and its validation score."""

    epochs: int = 0
    best_epoch: int = 0
    best_score: float = float("-inf")
    history: list[float] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def collate(features: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags -> zero-padded tiles [B, N_max, D] float32 and mask [B, N_max] (True on real tiles)."""
    longest = max(len(f) for f in features)
    x = torch.zeros(len(features), longest, features[0].shape[1], dtype=torch.float32)
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    for i, f in enumerate(features):
        x[i, : len(f)] = torch.from_numpy(np.asarray(f, dtype=np.float32))
        mask[i, : len(f)] = True
    return x.to(device), mask.to(device)


def _chunks(features: list[np.ndarray], max_tiles: int) -> list[list[np.ndarray]]:
    """Consecutive groups of bags whose padded size (bags x longest bag) stays within `max_tiles` (>= 1 bag each)."""
    groups: list[list[np.ndarray]] = []
    longest = 0
    for f in features:
        longest_with = max(longest, len(f))
        if groups and longest_with * (len(groups[-1]) + 1) <= max_tiles:
            groups[-1].append(f)
            longest = longest_with
        else:
            groups.append([f])
            longest = len(f)
    return groups


@torch.no_grad()
def predict_outputs(model: nn.Module, features: list[np.ndarray], device: torch.device,
                    max_tiles: int = 65536) -> torch.Tensor:
    """Model outputs [n, K] for every bag, in eval mode (no dropout), on the CPU; padded batches of <= max_tiles."""
    model.eval()
    return torch.cat([model(*collate(group, device))[0].float().cpu() for group in _chunks(features, max_tiles)])


def _subset(targets: Targets, idx: torch.Tensor) -> Targets:
    return {k: v[idx] for k, v in targets.items()}


def _epoch_order(data: BagSet, gen: torch.Generator) -> torch.Tensor:
    if data.sampling_weights is None:
        return torch.randperm(len(data), generator=gen)
    weights = torch.as_tensor(data.sampling_weights, dtype=torch.float64)
    return torch.multinomial(weights, len(data), replacement=True, generator=gen)


def _train_epoch(model: nn.Module, objective: Objective, data: BagSet, opt: torch.optim.Optimizer,
                 gen: torch.Generator, device: torch.device) -> None:
    model.train()
    order = _epoch_order(data, gen)
    for start in range(0, len(order), objective.batch_size):
        idx = order[start: start + objective.batch_size]
        x, mask = collate([data.features[i] for i in idx.tolist()], device)
        loss = objective.loss(model(x, mask)[0].float().cpu(), _subset(data.targets, idx))
        if loss is None:
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _val_score(model: nn.Module, objective: Objective, val: BagSet, cfg: MilTrainConfig,
               device: torch.device) -> float:
    """Higher is better: minus the validation loss, or the validation metric."""
    out = predict_outputs(model, val.features, device)
    if cfg.early_stop_on == "metric":
        return float(objective.metric(out, val.targets))
    loss = objective.loss(out, val.targets)
    return float("nan") if loss is None else -float(loss)


def fit_mil(model: nn.Module, objective: Objective, train: BagSet, val: BagSet, cfg: MilTrainConfig,
            seed: int) -> FitLog:
    """Train `model` in place on `train`, keep the weights of its best validation epoch; returns the log."""
    device = resolve_device(cfg.device)
    model.to(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fit, best_state, since_best = FitLog(), None, 0
    for epoch in range(1, cfg.max_epochs + 1):
        _train_epoch(model, objective, train, opt, gen, device)
        score = _val_score(model, objective, val, cfg, device)
        fit.epochs, since_best = epoch, since_best + 1
        fit.history.append(score)
        if score > fit.best_score:
            fit.best_epoch, fit.best_score, since_best = epoch, score, 0
            best_state = copy.deepcopy(model.state_dict())
        if epoch >= cfg.min_epochs and since_best >= cfg.patience:
            break
    if best_state is None:
        log.warning("validation score was never finite (%s); keeping the last epoch's weights", fit.history[-3:])
        fit.best_epoch = fit.epochs
    else:
        model.load_state_dict(best_state)
    log.info("fold trained %d epochs, kept epoch %d (validation score %.4f)", fit.epochs, fit.best_epoch,
             fit.best_score)
    return fit


def slide_classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """y [n] ints in 0..C-1, prob [n, C] -> macro one-vs-rest AUC (binary: AUC of class 1), balanced accuracy,
    weighted and macro F1 (prediction = argmax), with the conventions of `evaluate/metrics.py`."""
    num_classes = prob.shape[1]
    pred = prob.argmax(axis=1)
    return {
        "auc_macro": metrics.macro_auc(y, prob),
        "balanced_accuracy": metrics.balanced_accuracy(y, pred, num_classes),
        "f1_weighted": metrics.f1(y, pred, "weighted", num_classes),
        "f1_macro": metrics.f1(y, pred, "macro", num_classes),
    }


def class_balanced_weights(y: np.ndarray) -> np.ndarray:
    """One weight per bag, 1 / (bags of its class): each class is drawn equally often in expectation."""
    counts = np.bincount(y)
    return 1.0 / counts[y]


def classification_objective(batch_size: int) -> Objective:
    def loss(out: torch.Tensor, t: Targets) -> torch.Tensor:
        return F.cross_entropy(out, t["y"])

    def metric(out: torch.Tensor, t: Targets) -> float:
        return metrics.macro_auc(t["y"].numpy(), torch.softmax(out, -1).numpy())

    return Objective(loss, metric, batch_size)


def fit_abmil(train: tuple[list[np.ndarray], np.ndarray], val: tuple[list[np.ndarray], np.ndarray],
              num_classes: int, model_cfg: MilModelConfig, train_cfg: MilTrainConfig, seed: int) -> tuple[ABMIL, FitLog]:
    """Train ABMIL on (bags, labels [n] ints) with class-balanced sampling; returns the model with its kept weights."""
    feats, y = train
    if len(np.unique(y)) < 2:
        raise ValueError(f"the training split holds one class only ({np.unique(y)}); ABMIL needs two or more")
    torch.manual_seed(seed)
    model = ABMIL(feats[0].shape[1], num_classes, model_cfg)
    train_set = BagSet(feats, {"y": torch.as_tensor(y, dtype=torch.long)}, class_balanced_weights(y))
    val_set = BagSet(val[0], {"y": torch.as_tensor(val[1], dtype=torch.long)})
    fit = fit_mil(model, classification_objective(train_cfg.batch_size), train_set, val_set, train_cfg, seed)
    return model, fit


def predict_proba(model: ABMIL, features: list[np.ndarray], device: str = "auto") -> np.ndarray:
    """Class probabilities [n, C] for bags of [N_i, D] tiles."""
    return torch.softmax(predict_outputs(model, features, resolve_device(device)), dim=-1).numpy()
