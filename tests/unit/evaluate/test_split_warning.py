"""Issue 13.10: rows (or slides) split with no case/patient column are warned about, in the log and in report.md,
because augmented copies of one source image then leak across the split; a case or split column silences it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpfm_scale.contracts.features import write_image_features, write_index
from gpfm_scale.evaluate import stage
from gpfm_scale.evaluate.config import EvaluateConfig, SplitConfig
from gpfm_scale.evaluate.slide_tasks import Units, make_folds
from gpfm_scale.evaluate.splits import prepare_patch_data

LEAK = "split independently"


def _index(n: int = 60, **columns: list) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(0)
    labels = ["abc"[i % 3] for i in range(n)]
    index = pd.DataFrame({"slide_id": [f"im{i:03d}" for i in range(n)], "label": labels, **columns})
    return rng.normal(size=(n, 4)).astype(np.float32), index


@pytest.mark.parametrize("split_cfg, columns, reason", [
    (SplitConfig(group_column=None), {}, "split.group_column is null"),
    (SplitConfig(), {}, "the index has no 'case_id' column"),
    (SplitConfig(), {"case_id": [None] * 6 + [f"c{i // 3}" for i in range(6, 60)]}, "6 of 60 rows have no 'case_id'"),
])
def test_patch_rows_split_independently_are_warned(split_cfg, columns, reason, caplog):
    features, index = _index(**columns)
    with caplog.at_level(logging.WARNING, logger="gpfm_scale.evaluate.splits"):
        data = prepare_patch_data(features, index, split_cfg, seed=0)
    assert data.split_warning is not None and LEAK in data.split_warning and reason in data.split_warning
    assert any(r.levelno == logging.WARNING and data.split_warning in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("columns", [{"case_id": [f"c{i // 3}" for i in range(60)]},
                                     {"split": (["train"] * 40 + ["val"] * 8 + ["test"] * 12)}])
def test_a_case_or_split_column_gives_no_warning(columns, caplog):
    features, index = _index(**columns)
    with caplog.at_level(logging.WARNING, logger="gpfm_scale.evaluate.splits"):
        data = prepare_patch_data(features, index, SplitConfig(), seed=0)
    assert data.split_warning is None and not any(LEAK in r.getMessage() for r in caplog.records)


def _units(rows: list[dict]) -> Units:
    """Slides that are each their own case (what `_case_ids` gives when no bag has a case column)."""
    ids = [f"s{i}" for i in range(len(rows))]
    return Units([np.zeros((2, 4), np.float32)] * len(rows), rows, np.array(ids, dtype=object), ids)


def test_slides_without_a_case_column_are_warned_and_with_one_are_not(caplog):
    strata = np.arange(20) % 2
    units = _units([{"label": int(s)} for s in strata])
    with caplog.at_level(logging.WARNING, logger="gpfm_scale.evaluate.slide_tasks"):
        make_folds(units, strata, EvaluateConfig(split={"group_column": None}, slide={"num_folds": 4}))
    assert units.split_warning and "slides are split independently" in units.split_warning
    assert any(units.split_warning in r.getMessage() for r in caplog.records)
    with_cases = _units([{"label": int(s), "case_id": f"p{i // 2}"} for i, s in enumerate(strata)])
    make_folds(with_cases, strata, EvaluateConfig(slide={"num_folds": 4}))
    assert with_cases.split_warning is None


def test_the_report_carries_the_warning(tmp_path: Path):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    paths = [f"{'abc'[c]}/im{i}.png" for i, c in enumerate(y)]
    write_image_features(tmp_path / "emb", rng.normal(size=(60, 6)) + 2 * np.eye(6)[y], paths, "m")
    write_index(tmp_path / "emb", [{"slide_id": p, "kind": "image", "file": "features/images.h5", "row": i, "n": 1,
                                    "label": "abc"[c], "image": p} for i, (p, c) in enumerate(zip(paths, y))])
    res = stage.run(EvaluateConfig(bootstrap=0), [str(tmp_path / "emb")], ["knn"], str(tmp_path / "out"))
    md = Path(res.report_md).read_text()
    warnings = md.split("## Warnings")[1].split("\n## ")[0]
    assert "**m** (patch tasks): patch rows are split independently (the index has no 'case_id' column)" in warnings
