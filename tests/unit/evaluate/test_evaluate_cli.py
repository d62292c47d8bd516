"""`gpfm-scale evaluate` settings reach every task: the CLI's --seed and --bootstrap are the slide tasks' seed and
resample count too (they used to read a `slide` section of their own), and the old slide keys name their new home."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpfm_scale.cli import main
from gpfm_scale.contracts.features import write_index, write_slide_features
from gpfm_scale.evaluate.synthetic_bags import make_survival_bags

TINY_MIL = ["--set", "slide.num_folds=3", "--set", "slide.train.max_epochs=2", "--set", "slide.train.min_epochs=0",
            "--set", "slide.train.device=cpu", "--set", "slide.model.hidden_dim=8", "--set",
            "slide.model.attention_dim=4", "--set", "slide.survival.num_bins=2"]


def _slide_embedding(directory: Path) -> Path:
    """18 one-slide cases with survival labels and a two-class label."""
    rows = []
    for i, bag in enumerate(make_survival_bags(num_cases=18, dim=4, bag_size=(3, 5), seed=0)):
        rel = write_slide_features(directory, bag.slide_id, bag.features, bag.coords, "tiny")
        rows.append({**bag.row, "label": "ab"[i % 2], "file": rel, "row": -1, "n": len(bag.features)})
    write_index(directory, rows)
    return directory


def test_cli_seed_and_bootstrap_reach_the_slide_tasks(tmp_path, capsys):
    emb = _slide_embedding(tmp_path / "emb")
    out = tmp_path / "report"
    argv = ["evaluate", "--features", str(emb), "--task", "abmil,survival", "--out", str(out), "--seed", "7",
            "--bootstrap", "3", *TINY_MIL]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    for task in ("abmil", "survival"):
        info = doc["info"]["tiny"][task]
        assert info["seed"] == 7, (task, info["seed"])
        assert "(3 replicates" in info["ci"], (task, info["ci"])
        assert np.isfinite(doc["results"]["tiny"][task][next(iter(doc["results"]["tiny"][task]))]["value"])
    assert doc["seed"] == 7 and doc["config"]["bootstrap"] == 3 and "seed" not in doc["config"]["slide"]


@pytest.mark.parametrize("old,new", [("slide.seed=3", "is now seed"), ("slide.num_bootstrap=3", "is now bootstrap"),
                                     ("slide.case_column=patient", "is now split.group_column"),
                                     ("slide.split_column=fold", "is now split.split_column"),
                                     ("slide.ci_level=0.9", "is now ci_level")])
def test_old_slide_keys_are_refused_naming_the_key_that_owns_the_value(old, new, capsys):
    assert main(["evaluate", "--set", old, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"slide.{old.split('.')[1].split('=')[0]} {new}" in err, err
