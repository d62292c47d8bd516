"""The censoring convention on load: structural refusals, explicit conversion, and the flipped-label test."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gpfm_scale.errors import ConfigError, GpfmError
from gpfm_scale.evaluate.censoring import event_later_probability, survival_targets
from gpfm_scale.evaluate.slide_config import SurvivalConfig
from gpfm_scale.evaluate.synthetic_bags import make_survival_bags


def _rows(flip: bool = False, seed: int = 0) -> list[dict]:
    rows = [dict(b.row) for b in make_survival_bags(num_cases=80, dim=4, bag_size=(1, 2), seed=seed)]
    for r in rows:
        r["event"] = 1 - r["event"] if flip else r["event"]
    return rows


def test_event_later_probability_by_hand():
    """Event times {1, 3}, censored {2, 4}: only (3 > 2) of the four pairs has the event later; a tie counts 1/2."""
    assert event_later_probability(np.array([1.0, 2, 3, 4]), np.array([1, 0, 1, 0])) == pytest.approx(0.25)
    assert event_later_probability(np.array([2.0, 2, 3, 1]), np.array([1, 0, 1, 0])) == pytest.approx(3.5 / 4)
    assert np.isnan(event_later_probability(np.array([1.0, 2]), np.array([1, 1])))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_labels_pass_and_flipped_labels_are_refused(seed):
    times, events, check = survival_targets(_rows(seed=seed), SurvivalConfig())
    assert not check.suspect and check.event_later_prob < 0.35
    assert events.dtype == bool and check.num_events == events.sum() and times.min() >= 0
    with pytest.raises(GpfmError, match="look flipped"):
        survival_targets(_rows(flip=True, seed=seed), SurvivalConfig())


def test_warn_mode_logs_and_marks_the_labels(caplog):
    with caplog.at_level(logging.WARNING, logger="gpfm_scale.evaluate.censoring"):
        _, _, check = survival_targets(_rows(flip=True), SurvivalConfig(censoring_check="warn"))
    assert check.suspect and check.event_later_prob >= 0.65
    assert "look flipped" in caplog.text


def test_too_few_of_either_kind_is_not_tested():
    rows = [{"slide_id": str(i), "time": float(i), "event": int(i >= 5)} for i in range(1, 9)]
    _, _, check = survival_targets(rows, SurvivalConfig())
    assert check.event_later_prob == 1.0 and not check.suspect


def test_a_censorship_column_without_event_is_refused_with_the_fix():
    rows = [{"slide_id": r["slide_id"], "time": r["time"], "censorship": 1 - r["event"]} for r in _rows()]
    with pytest.raises(ConfigError, match="censorship_column='censorship'"):
        survival_targets(rows, SurvivalConfig())
    _, events, check = survival_targets(rows, SurvivalConfig(censorship_column="censorship"))
    np.testing.assert_array_equal(events, [r["event"] == 1 for r in _rows()])
    assert check.source == "1 - censorship" and not check.suspect


def test_event_and_censorship_must_be_complements():
    rows = _rows()
    for r in rows:
        r["censorship"] = r["event"]
    with pytest.raises(GpfmError, match="one of them is flipped"):
        survival_targets(rows, SurvivalConfig())
    rows[0]["censorship"] = 1 - rows[0]["event"]
    with pytest.raises(GpfmError, match="disagree"):
        survival_targets(rows, SurvivalConfig())


@pytest.mark.parametrize("field,value,match", [("event", 2, "expected 0 or 1"), ("event", float("nan"), "0 or 1"),
                                               ("time", -1.0, "finite time"), ("time", None, "finite time")])
def test_bad_values_are_refused(field, value, match):
    rows = _rows()
    rows[3][field] = value
    with pytest.raises(GpfmError, match=match):
        survival_targets(rows, SurvivalConfig())
