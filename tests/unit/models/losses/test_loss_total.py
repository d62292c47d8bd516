"""LossWeights defaults and weighted_total: which terms enter, and the errors for mismatches."""

from __future__ import annotations

import pytest
import torch

from gpfm_scale.config import build_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.losses import LossWeights, weighted_total

TERMS = {
    "dino_local": torch.tensor(1.0),
    "dino_global": torch.tensor(2.0),
    "koleo": torch.tensor(3.0),
    "ibot": torch.tensor(4.0),
    "expert/uni/cls": torch.tensor(5.0),
}


def test_recipe_defaults_and_strict_keys() -> None:
    assert LossWeights().as_mapping() == {"dino_local": 1.0, "dino_global": 1.0, "koleo": 0.1, "ibot": 1.0}
    with pytest.raises(ConfigError, match="dino"):
        build_config(LossWeights, {"dino": 1.0})


def test_total_is_the_weighted_sum() -> None:
    weights = {**LossWeights().as_mapping(), "expert/uni/cls": 0.5}
    assert weighted_total(TERMS, weights).item() == pytest.approx(1 + 2 + 0.1 * 3 + 4 + 0.5 * 5)


def test_unweighted_or_missing_terms_raise() -> None:
    with pytest.raises(KeyError, match="expert/uni/cls"):
        weighted_total(TERMS, LossWeights())
    partial = {k: v for k, v in TERMS.items() if k != "ibot"}
    with pytest.raises(KeyError, match="ibot"):
        weighted_total(partial, {**LossWeights().as_mapping(), "expert/uni/cls": 1.0})


def test_zero_weight_terms_are_left_out_even_when_nan() -> None:
    terms = {**TERMS, "ibot": torch.tensor(float("nan"))}
    weights = {**LossWeights(ibot=0.0).as_mapping(), "expert/uni/cls": 1.0}
    assert weighted_total(terms, weights).item() == pytest.approx(1 + 2 + 0.3 + 5)
    no_ibot = {k: v for k, v in TERMS.items() if k != "ibot"}
    assert weighted_total(no_ibot, weights).item() == pytest.approx(1 + 2 + 0.3 + 5)
