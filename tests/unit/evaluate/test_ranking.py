"""Rank aggregation on hand-made tables, with ties and missing entries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gpfm_scale.evaluate.metrics import Metric
from gpfm_scale.evaluate.ranking import rank_markdown, rank_models, scores_table, summarize_ranks

NAN = np.nan


def hand_table() -> pd.DataFrame:
    return pd.DataFrame({"A": [0.9, 0.8, 0.5, 0.9], "B": [0.8, 0.8, 0.7, NAN], "C": [0.7, 0.6, 0.7, 0.8]},
                        index=["t1", "t2", "t3", "t4"])


def test_ranks_average_ties_and_keep_missing():
    ranks = rank_models(hand_table())
    expected = pd.DataFrame({"A": [1, 1.5, 3, 1], "B": [2, 1.5, 1.5, NAN], "C": [3, 3, 1.5, 2]},
                            index=["t1", "t2", "t3", "t4"], dtype=float)
    pd.testing.assert_frame_equal(ranks, expected)


def test_average_rank_and_first_places_by_hand():
    s = summarize_ranks(hand_table())
    # A: (1 + 1.5 + 3 + 1) / 4; B: (2 + 1.5 + 1.5) / 3 over the 3 tasks it has; C: (3 + 3 + 1.5 + 2) / 4
    assert list(s.average_rank.index) == ["A", "B", "C"]
    assert s.average_rank.to_dict() == pytest.approx({"A": 1.625, "B": 5 / 3, "C": 2.375})
    # a tie for the top counts as a first place for each tied model (t2: A and B; t3: B and C)
    assert s.first_places.to_dict() == {"A": 3, "B": 2, "C": 1}
    md = rank_markdown(s)
    assert "| t2 | 0.800 (1.5) | 0.800 (1.5) | 0.600 (3) |" in md
    assert "| t4 | 0.900 (1) | n/a | 0.800 (2) |" in md
    assert "**3 of 4**" in md and "**2 of 3**" in md


def test_lower_is_better_reverses_the_order():
    s = summarize_ranks(hand_table(), higher_is_better=False)
    assert s.ranks.loc["t1"].tolist() == [3.0, 2.0, 1.0]
    assert s.first_places["C"] == 3  # t1, t2, t4 (lowest); t3: A alone


def test_the_seed_articles_headline_numbers():
    """39 tasks, 5 models: first on 29, second on 6, third on 4 -> average rank 53 / 39 = 1.36 (GPFM's numbers)."""
    rng = np.random.default_rng(0)
    others = rng.uniform(0.5, 0.8, size=(39, 4))
    others.sort(1)
    gpfm = np.r_[np.full(29, 0.95), (others[29:35, 3] + others[29:35, 2]) / 2,
                 (others[35:, 2] + others[35:, 1]) / 2]
    table = pd.DataFrame(np.column_stack([gpfm, others]), columns=["GPFM", "m1", "m2", "m3", "m4"],
                         index=[f"task{i}" for i in range(39)])
    s = summarize_ranks(table)
    assert round(s.average_rank["GPFM"], 2) == 1.36 and s.first_places["GPFM"] == 29
    assert s.average_rank.index[0] == "GPFM"


def test_scores_table_takes_each_tasks_metric_and_drops_unrankable_tasks():
    results = {"A": {"knn": {"balanced_accuracy": Metric(0.7), "auc_macro": Metric(0.9)}, "odd": {"x": Metric(1.0)}},
               "B": {"knn": {"balanced_accuracy": Metric(0.6)}}}
    table = scores_table(results, {"knn": "balanced_accuracy", "odd": "missing"})
    assert table.to_dict() == {"A": {"knn": 0.7}, "B": {"knn": 0.6}}
