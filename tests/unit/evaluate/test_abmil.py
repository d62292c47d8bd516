"""ABMIL: it separates synthetic two-class bags and looks at the informative tiles; padding, seeding, balanced
sampling and early stopping behave as documented; metrics agree with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from gpfm_scale.evaluate.abmil import (
    ABMIL,
    BagSet,
    Objective,
    _epoch_order,
    class_balanced_weights,
    collate,
    fit_abmil,
    fit_mil,
    predict_outputs,
    predict_proba,
    slide_classification_metrics,
)
from gpfm_scale.evaluate.slide_config import MilModelConfig, MilTrainConfig
from gpfm_scale.evaluate.synthetic_bags import make_two_class_bags

torch.set_num_threads(1)
FAST = MilTrainConfig(max_epochs=15, min_epochs=5, patience=5, device="cpu")


def _split(bags, a, b):
    return [x.features for x in bags[a:b]], np.array([x.row["label"] for x in bags[a:b]])


def test_abmil_separates_two_class_bags_and_attends_to_the_signal():
    bags = make_two_class_bags(num_cases=80, dim=16, seed=0)
    model, fit = fit_abmil(_split(bags, 0, 50), _split(bags, 50, 60), 2, MilModelConfig(), FAST, seed=0)
    feats, y = _split(bags, 60, 80)
    prob = predict_proba(model, feats, "cpu")
    assert roc_auc_score(y, prob[:, 1]) > 0.9
    assert 1 <= fit.best_epoch <= fit.epochs <= FAST.max_epochs
    model.eval()
    hits = []
    for bag in bags[60:]:
        if bag.row["label"] == 1:
            _, attention = model(torch.from_numpy(bag.features)[None])
            hits.append(int(attention[0].argmax()) in bag.row["informative_tiles"])
    assert np.mean(hits) >= 0.8


def test_padded_batch_equals_bags_one_at_a_time():
    torch.manual_seed(0)
    model = ABMIL(8, 3, MilModelConfig(hidden_dim=32, attention_dim=16)).eval()
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 7, 5)]
    x, mask = collate(bags, torch.device("cpu"))
    assert x.shape == (3, 7, 8) and mask.sum(1).tolist() == [3, 7, 5]
    with torch.no_grad():
        batched, attention = model(x, mask)
        for i, bag in enumerate(bags):
            alone, att_alone = model(torch.from_numpy(bag)[None])
            torch.testing.assert_close(batched[i], alone[0])
            torch.testing.assert_close(attention[i, : len(bag)], att_alone[0])
    assert attention[0, 3:].abs().sum() == 0 and torch.allclose(attention.sum(1), torch.ones(3))
    one_by_one = predict_outputs(model, bags, torch.device("cpu"), max_tiles=7)
    torch.testing.assert_close(one_by_one, predict_outputs(model, bags, torch.device("cpu"), max_tiles=10**6))
    torch.testing.assert_close(one_by_one, batched)


def test_same_seed_same_model_other_seed_other_model():
    bags = make_two_class_bags(num_cases=12, dim=8, bag_size=(5, 8), seed=1)
    cfg = MilTrainConfig(max_epochs=2, min_epochs=0, patience=5, device="cpu")
    small = MilModelConfig(hidden_dim=16, attention_dim=8)
    a, _ = fit_abmil(_split(bags, 0, 8), _split(bags, 8, 12), 2, small, cfg, seed=3)
    b, _ = fit_abmil(_split(bags, 0, 8), _split(bags, 8, 12), 2, small, cfg, seed=3)
    c, _ = fit_abmil(_split(bags, 0, 8), _split(bags, 8, 12), 2, small, cfg, seed=4)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_class_balanced_sampling_draws_classes_equally():
    y = np.array([0] * 9 + [1] * 3)
    np.testing.assert_allclose(class_balanced_weights(y), [1 / 9] * 9 + [1 / 3] * 3)
    data = BagSet([np.zeros((1, 2), np.float32)] * 12, {}, class_balanced_weights(y))
    gen = torch.Generator().manual_seed(0)
    drawn = np.concatenate([y[_epoch_order(data, gen).numpy()] for _ in range(400)])
    assert len(drawn) == 4800 and abs(drawn.mean() - 0.5) < 0.03


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    """Scripted validation scores: best at epoch 2, then 2 worse epochs with patience 2 -> stop at epoch 4."""
    scores = iter([0.1, 0.5, 0.4, 0.3, 0.9, 0.9])
    seen = []
    torch.manual_seed(0)
    model = ABMIL(4, 2, MilModelConfig(hidden_dim=8, attention_dim=4))

    def metric(out, t):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    objective = Objective(lambda out, t: torch.nn.functional.cross_entropy(out, t["y"]), metric, batch_size=2)
    data = BagSet([np.ones((3, 4), np.float32) * i for i in range(4)], {"y": torch.tensor([0, 1, 0, 1])})
    cfg = MilTrainConfig(max_epochs=6, min_epochs=0, patience=2, early_stop_on="metric", device="cpu", lr=1e-2)
    fit = fit_mil(model, objective, data, data, cfg, seed=0)
    assert (fit.epochs, fit.best_epoch, fit.best_score) == (4, 2, 0.5)
    assert fit.history == [0.1, 0.5, 0.4, 0.3]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, seen[1][k])
    assert not torch.equal(seen[1]["head.weight"], seen[3]["head.weight"])


@pytest.mark.parametrize("num_classes", [2, 3])
def test_slide_classification_metrics_match_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    y = np.arange(30) % num_classes
    prob = rng.dirichlet(np.ones(num_classes), size=30) + np.eye(num_classes)[y] * 0.3
    prob /= prob.sum(1, keepdims=True)
    got = slide_classification_metrics(y, prob)
    pred = prob.argmax(1)
    auc = roc_auc_score(y, prob[:, 1]) if num_classes == 2 else roc_auc_score(y, prob, multi_class="ovr")
    assert got["auc_macro"] == pytest.approx(auc)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert got["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
