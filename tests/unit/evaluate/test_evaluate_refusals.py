"""Evaluation refuses what would be silently wrong or a traceback: non-finite features, an index pointing outside
its directory, an unusable or busy --out (exit 2, one line); report file names stay in the report directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gpfm_scale.atomic import current_umask
from gpfm_scale.cli import main
from gpfm_scale.contracts.features import write_image_features, write_index, write_slide_features
from gpfm_scale.errors import GpfmError
from gpfm_scale.evaluate import stage
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.report import slug
from gpfm_scale.run_lock import OutputLock

FAST = ["--bootstrap", "5", "--set", "split.group_column=null"]


def _images(directory: Path, n: int = 30, nan_rows: tuple[int, ...] = ()) -> Path:
    y = np.arange(n) % 3
    x = np.random.default_rng(0).normal(size=(n, 4)) + 2 * np.eye(4)[y]
    x[list(nan_rows)] = np.nan
    paths = [f"{'abc'[c]}/im{i}.png" for i, c in enumerate(y)]
    write_image_features(directory, x, paths, "tiny")
    write_index(directory, [{"slide_id": p, "kind": "image", "file": "features/images.h5", "row": i, "n": 1,
                             "label": "abc"[c], "image": p} for i, (p, c) in enumerate(zip(paths, y))])
    return directory


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpfm-scale evaluate: error: ")
    return lines[0]


def test_non_finite_image_features_exit_2_naming_the_file(tmp_path, capsys):
    emb = _images(tmp_path / "emb", nan_rows=(3, 7))
    assert main(["evaluate", "--features", str(emb), "--task", "knn", "--out", str(tmp_path / "r"), *FAST]) == 2
    line = _one_error_line(capsys)
    assert "images.h5" in line and "2 of 30" in line and "a/im3.png" in line and "finite" in line


def test_non_finite_slide_features_name_every_file(tmp_path):
    emb = tmp_path / "emb"
    rows = []
    for i in range(4):
        feats = np.full((3, 4), float(i), np.float32)
        if i in (1, 2):
            feats[0, 0] = np.inf if i == 1 else np.nan
        rows.append({"slide_id": f"s{i}", "kind": "slide", "n": 3, "row": -1, "label": "ab"[i % 2],
                     "file": write_slide_features(emb, f"s{i}", feats, np.zeros((3, 2), np.int64), "tiny")})
    write_index(emb, rows)
    with pytest.raises(GpfmError, match=r"features/s1\.h5 \(1 rows\), features/s2\.h5"):
        stage.run(EvaluateConfig(), [str(emb)], ["abmil"], str(tmp_path / "r"))


def test_an_index_file_outside_features_is_refused(tmp_path):
    emb = tmp_path / "emb"
    rel = write_slide_features(emb, "s0", np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64), "tiny")
    os.replace(emb / rel, tmp_path / "elsewhere.h5")
    write_index(emb, [{"slide_id": "s0", "kind": "slide", "file": "../elsewhere.h5", "row": -1, "n": 3}])
    with pytest.raises(GpfmError, match="not features/NAME"):
        stage.run(EvaluateConfig(), [str(emb)], ["abmil"], str(tmp_path / "r"))


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_unusable_out_exits_2_with_one_line(tmp_path, capsys, where):
    emb = _images(tmp_path / "emb")
    (tmp_path / "plain").write_text("x")
    out = {"file": tmp_path / "plain", "under_file": tmp_path / "plain" / "r", "proc": Path("/proc/gpfm-r")}[where]
    assert main(["evaluate", "--features", str(emb), "--task", "knn", "--out", str(out), *FAST]) == 2
    assert str(out) in _one_error_line(capsys)


def test_a_second_run_into_one_out_exits_2_naming_the_holder(tmp_path, capsys):
    emb = _images(tmp_path / "emb")
    with OutputLock(str(tmp_path / "r"), "evaluate"):
        assert main(["evaluate", "--features", str(emb), "--task", "knn", "--out", str(tmp_path / "r"), *FAST]) == 2
    line = _one_error_line(capsys)
    assert "gpfm-scale evaluate" in line.split("error: ", 1)[1] and f"pid {os.getpid()}" in line


def test_report_files_get_the_umask_mode(tmp_path):
    emb = _images(tmp_path / "emb")
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        res = stage.run(EvaluateConfig(bootstrap=5, split={"group_column": None}), [str(emb)], ["knn"],
                        str(tmp_path / "r"))
    finally:
        os.umask(old)
    files = [p for p in Path(res.out).rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"results.json", "report.md"} and any(p.suffix == ".png" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}


@pytest.mark.parametrize("name", ["..", ".", "../../x", ".hidden", "a/b", "", "_", "x" * 300])
def test_slug_is_one_visible_path_component(name):
    s = slug(name)
    assert s not in (".", "..") and not s.startswith(".") and "/" not in s and 0 < len(s) <= 80
