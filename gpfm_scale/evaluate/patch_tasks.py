"""Patch-level tasks on frozen features: linear probe (torch, and scikit-learn's as UNI), cosine kNN, few-shot
(SimpleShot) and retrieval.

Every task gets a `PatchData` (features [N, D], labels [N], a train/val/test split) and the `EvaluateConfig`,
and reports metrics on the test split only; `evaluate/tasks.py` registers them. Which data each one learns from:
- linear probe: train, with val for early stopping (the only task that selects anything on val);
- logreg (UNI/CONCH protocol): train + val, a fixed C, so nothing is selected on val;
- kNN, few-shot, retrieval: train + val as the memory bank / support pool (nothing is tuned on val, so
  holding it out would only weaken them; with a given train/test split this is the whole train set, as UNI).
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from collections.abc import Iterator

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from gpfm_scale.errors import GpfmError
from gpfm_scale.evaluate.config import EvaluateConfig, LogRegConfig, ProbeConfig
from gpfm_scale.evaluate.metrics import (Metric, balanced_accuracy, bootstrap_mean, classification_metrics, f1,
                                         macro_auc, percentile_ci)
from gpfm_scale.evaluate.results import TaskResult
from gpfm_scale.evaluate.splits import PatchData

log = logging.getLogger(__name__)

def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """z-score with the train rows' mean and std (std floored at 1e-6: constant features stay 0)."""
    mean = train.mean(0, keepdims=True)
    std = np.maximum(train.std(0, keepdims=True), 1e-6)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def _memory(data: PatchData) -> tuple[np.ndarray, np.ndarray]:
    mask = data.split != "test"
    return data.features[mask], data.labels[mask]


@contextmanager
def torch_threads(num: int | None) -> Iterator[None]:
    """Run a block with `num` torch CPU threads, restoring the previous count after (None: unchanged)."""
    before = torch.get_num_threads()
    if num is not None:
        torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], num_classes: int,
                       cfg: ProbeConfig, seed: int) -> tuple[nn.Linear, dict[str, float]]:
    """Multinomial logistic regression [D -> C] on (features [N, D] float32, labels [N]) pairs, AdamW with a
    per-step cosine decay to 0 over `max_epochs`.

    Zero-initialised (the loss is convex, so this loses nothing and needs no random init); batches are drawn
    with a private generator seeded by `seed`, so the result does not depend on global torch RNG state.
    The weights kept are those of the epoch with the best validation macro-AUC (validation loss when the
    val split has a single class); training stops after `patience` epochs without improvement.
    """
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    xv, y_val = torch.from_numpy(val[0]), val[1]
    model = nn.Linear(xt.shape[1], num_classes)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(xt) / cfg.batch_size)
    total = cfg.max_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = nn.CrossEntropyLoss()
    best, best_state, best_epoch, wait = -math.inf, copy.deepcopy(model.state_dict()), 0, 0
    for epoch in range(cfg.max_epochs):
        model.train()
        for batch in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xt[batch]), yt[batch]).backward()
            opt.step()
            sched.step()
        score = _val_score(model, xv, y_val)
        if score > best + 1e-9:
            best, best_state, best_epoch, wait = score, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            wait += 1
            if wait >= cfg.patience:
                break
    model.load_state_dict(best_state)
    log.info("linear probe: best val score %.4f at epoch %d of %d", best, best_epoch + 1, epoch + 1)
    return model, {"best_epoch": best_epoch + 1, "epochs_run": epoch + 1, "val_score": best}


@torch.no_grad()
def _val_score(model: nn.Module, xv: torch.Tensor, yv: np.ndarray) -> float:
    model.eval()
    logits = model(xv)
    auc = macro_auc(yv, logits.softmax(1).numpy())
    if np.isfinite(auc):
        return auc
    return -float(nn.functional.cross_entropy(logits, torch.from_numpy(yv)))


def linear_probe(data: PatchData, cfg: EvaluateConfig) -> TaskResult:
    """REFERENCE.md protocol: logistic regression on frozen features, early stopping on val macro-AUC."""
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = (data.part(s) for s in ("train", "val", "test"))
    if len(y_val) == 0:
        raise ValueError("the linear probe needs a validation split for early stopping (split.val > 0)")
    x_tr, x_val, x_te = standardise(x_tr, x_val, x_te)
    with torch_threads(cfg.probe.num_threads):
        model, info = train_linear_probe((x_tr, y_tr), (x_val, y_val), len(data.classes), cfg.probe, cfg.seed)
        with torch.no_grad():
            proba = model(torch.from_numpy(x_te)).softmax(1).numpy().astype(np.float64)
    metrics = classification_metrics(y_te, proba, cfg.bootstrap, cfg.seed, cfg.ci_level)
    return TaskResult(metrics, y_te, proba, data.classes, info=info)


def uni_cost(dim: int, num_classes: int) -> float:
    """UNI's inverse regularisation strength C = D * C_classes / 100, i.e. lambda = 100 / (D * C_classes)
    (mahmoodlab/UNI uni/downstream/eval_patch_features/linear_probe.py `train_linear_probe`: `cost =
    (train_feats.shape[1] * NUM_C) / 100`)."""
    return dim * num_classes / 100


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, cfg: LogRegConfig) -> LogisticRegression:
    """scikit-learn's multinomial logistic regression (L-BFGS, L2, `max_iter`, random_state 0) on raw features
    x [N, D] (UNI does not standardise), labels y [N]; C from `cfg.C` or `uni_cost`."""
    cost = cfg.C if cfg.C is not None else uni_cost(x.shape[1], num_classes)
    model = LogisticRegression(C=cost, solver="lbfgs", max_iter=cfg.max_iter, random_state=0)
    return model.fit(x, y)


def logreg(data: PatchData, cfg: EvaluateConfig) -> TaskResult:
    """UNI/CONCH linear probe (UNI's linear_probe.py `_fit_logreg`: "Default settings follow CLIP (L-BFGS, 1K
    iterations)"): sklearn LogisticRegression, lbfgs, 1000 iterations, C = D * C_classes / 100, fit on train + val
    (UNI's `combine_trainval=True`), test class probabilities [N, C]. Beside `linear_probe` (AdamW + early stopping,
    GPFM's recipe) so numbers compare with the UNI and CONCH tables."""
    x_fit, y_fit = _memory(data)
    x_te, y_te = data.part("test")
    num_classes = len(data.classes)
    if len(np.unique(y_fit)) < num_classes:
        raise GpfmError("logreg: a class has no train/val row; every class must be seen to be predicted")
    model = fit_logreg(x_fit, y_fit, num_classes, cfg.logreg)
    proba = model.predict_proba(x_te)
    metrics = classification_metrics(y_te, proba, cfg.bootstrap, cfg.seed, cfg.ci_level)
    info = {"C": float(model.C), "iterations": int(np.max(model.n_iter_)), "max_iter": cfg.logreg.max_iter}
    if info["iterations"] >= cfg.logreg.max_iter:
        log.warning("logreg: L-BFGS stopped at max_iter=%d before converging", cfg.logreg.max_iter)
    return TaskResult(metrics, y_te, proba, data.classes, info=info)


def knn_scores(x_bank: np.ndarray, y_bank: np.ndarray, x_query: np.ndarray, num_classes: int, k: int,
               temperature: float, chunk: int = 2048) -> np.ndarray:
    """DINO's weighted kNN: cosine similarity, k nearest, each votes exp(sim / T) for its class.

    Returns [Nq, C] vote shares (rows sum to 1; the argmax is DINO's prediction, the shares rank samples
    per class for AUC). Subtracting each row's best similarity before exp changes no share but cannot overflow.
    """
    bank = x_bank / np.maximum(np.linalg.norm(x_bank, axis=1, keepdims=True), 1e-12)
    query = x_query / np.maximum(np.linalg.norm(x_query, axis=1, keepdims=True), 1e-12)
    k = min(k, len(bank))
    out = np.zeros((len(query), num_classes))
    for start in range(0, len(query), chunk):
        sim = query[start:start + chunk] @ bank.T
        nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn_idx, 1).astype(np.float64)
        weights = np.exp((nn_sim - nn_sim.max(1, keepdims=True)) / temperature)
        rows = np.repeat(np.arange(len(nn_idx)), k)
        np.add.at(out[start:start + chunk], (rows, y_bank[nn_idx].ravel()), weights.ravel())
    return out / out.sum(1, keepdims=True)


def knn(data: PatchData, cfg: EvaluateConfig) -> TaskResult:
    x_bank, y_bank = _memory(data)
    x_te, y_te = data.part("test")
    scores = knn_scores(x_bank, y_bank, x_te, len(data.classes), cfg.knn.k, cfg.knn.temperature)
    metrics = classification_metrics(y_te, scores, cfg.bootstrap, cfg.seed, cfg.ci_level)
    return TaskResult(metrics, y_te, scores, data.classes)


def simpleshot_predict(x_support: np.ndarray, y_support: np.ndarray, x_query: np.ndarray,
                       num_classes: int) -> np.ndarray:
    """SimpleShot (as UNI's few-shot ProtoNet): centre on the support mean, L2-normalise, nearest class mean."""
    mean = x_support.mean(0, keepdims=True)

    def norm(x: np.ndarray) -> np.ndarray:
        x = x - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    support, query = norm(x_support), norm(x_query)
    protos = np.stack([support[y_support == c].mean(0) for c in range(num_classes)])
    dist = (query ** 2).sum(1, keepdims=True) - 2 * query @ protos.T + (protos ** 2).sum(1)
    return dist.argmin(1)


def _spread(values: list[float], level: float) -> tuple[Metric, Metric]:
    """(mean with the central `level` interval of the draws, standard deviation over the draws)."""
    v = np.asarray(values)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return Metric(float(v.mean()), *percentile_ci(v, level)), Metric(std)


def few_shot(data: PatchData, cfg: EvaluateConfig) -> TaskResult:
    """k examples per class from train + val, `draws` random draws per k; test balanced accuracy and weighted F1.

    Reported per k as `balanced_accuracy_{k}shot`: the mean over draws, with the interval holding the
    central `ci_level` of the draws (the spread of support sets, not a bootstrap of the test set), and
    `balanced_accuracy_{k}shot_std`, the standard deviation over draws. Shot counts larger than the
    smallest class are skipped with a warning.
    """
    x_pool, y_pool = _memory(data)
    x_te, y_te = data.part("test")
    num_classes = len(data.classes)
    by_class = [np.flatnonzero(y_pool == c) for c in range(num_classes)]
    rng = np.random.default_rng(cfg.seed)
    metrics: dict[str, Metric] = {}
    for k in cfg.few_shot.shots:
        if k > min(len(ix) for ix in by_class):
            log.warning("few-shot: %d-shot skipped, a class has fewer than %d examples", k, k)
            continue
        bacc, f1w = [], []
        for _ in range(cfg.few_shot.draws):
            support = np.concatenate([rng.choice(ix, size=k, replace=False) for ix in by_class])
            pred = simpleshot_predict(x_pool[support], y_pool[support], x_te, num_classes)
            bacc.append(balanced_accuracy(y_te, pred, num_classes))
            f1w.append(f1(y_te, pred, "weighted", num_classes))
        for name, values in (("balanced_accuracy", bacc), ("f1_weighted", f1w)):
            metrics[f"{name}_{k}shot"], metrics[f"{name}_{k}shot_std"] = _spread(values, cfg.ci_level)
    return TaskResult(metrics, classes=data.classes, info={"draws": cfg.few_shot.draws})


def euclidean_neighbours(bank: np.ndarray, query: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """[Nq, k] indices of the k nearest bank rows by Euclidean distance, nearest first."""
    k = min(k, len(bank))
    bank_sq = (bank.astype(np.float64) ** 2).sum(1)
    out = []
    for start in range(0, len(query), chunk):
        q = query[start:start + chunk].astype(np.float64)
        dist = bank_sq[None] - 2 * q @ bank.T.astype(np.float64)
        part = np.argpartition(dist, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(dist, part, 1), axis=1, kind="stable")
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def retrieval_hits(neighbour_labels: np.ndarray, y_query: np.ndarray, k: int) -> np.ndarray:
    """Acc@K per query (UNI, Chen et al. 2024, Methods "ROI retrieval"): a hit when ANY of the K nearest
    database items has the query's class. [Nq, >=K] neighbour labels, nearest first -> [Nq] bool."""
    return (neighbour_labels[:, :k] == y_query[:, None]).any(1)


def majority_hits(neighbour_labels: np.ndarray, y_query: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """MVAcc@K per query: the majority class of the K nearest is the query's; ties go to the class whose
    member ranks nearest (deterministic, and the natural reading of a tied vote)."""
    top = neighbour_labels[:, :k]
    counts = np.zeros((len(top), num_classes))
    np.add.at(counts, (np.repeat(np.arange(len(top)), top.shape[1]), top.ravel()), 1.0)
    first_rank = np.full((len(top), num_classes), np.inf)
    for j in range(top.shape[1] - 1, -1, -1):
        first_rank[np.arange(len(top)), top[:, j]] = j
    key = np.where(np.isfinite(first_rank), counts * (k + 1) - first_rank, -np.inf)
    return key.argmax(1) == y_query


def retrieval(data: PatchData, cfg: EvaluateConfig) -> TaskResult:
    """CRC-100K protocol: z-score with database (train) statistics, Euclidean kNN, Acc@1/3/5 and MVAcc@5."""
    x_bank, y_bank = _memory(data)
    x_te, y_te = data.part("test")
    x_bank, x_te = standardise(x_bank, x_te)
    kmax = max([*cfg.retrieval.top_k, cfg.retrieval.majority_k])
    labels = y_bank[euclidean_neighbours(x_bank, x_te, kmax)]
    metrics = {f"acc_at_{k}": bootstrap_mean(retrieval_hits(labels, y_te, k), cfg.bootstrap, cfg.seed, cfg.ci_level)
               for k in sorted(cfg.retrieval.top_k)}
    mk = cfg.retrieval.majority_k
    metrics[f"mvacc_at_{mk}"] = bootstrap_mean(majority_hits(labels, y_te, mk, len(data.classes)), cfg.bootstrap,
                                               cfg.seed, cfg.ci_level)
    return TaskResult(metrics, classes=data.classes)
