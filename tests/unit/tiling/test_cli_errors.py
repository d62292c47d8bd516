"""`gpfm-scale tile` exits 2 with a one-line message, never a traceback, where the README promises it (issue 10)."""

from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd
import pytest

from gpfm_scale.cli import main
from gpfm_scale.run_lock import OutputLock


@pytest.fixture
def slides(tmp_path) -> Path:
    """A manifest of one slide: no test here gets as far as reading it."""
    pd.DataFrame({"slide_id": ["s1"], "path": [str(tmp_path / "s1.svs")]}).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def _exit_2(capsys, argv: list[str], match: str) -> None:
    assert main(["tile", *argv, "--log-level", "ERROR"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("gpfm-scale tile: error:")]
    assert len(lines) == 1 and match in lines[0], err


def test_out_on_a_read_only_filesystem(capsys, slides):
    _exit_2(capsys, ["--slides", str(slides), "--out", "/proc/gpfm-tiling-test-out"], "cannot write to --out")


def test_out_below_a_file(capsys, slides, tmp_path):
    (tmp_path / "f").write_text("x")
    _exit_2(capsys, ["--slides", str(slides), "--out", str(tmp_path / "f" / "out")], "cannot write to --out")


def test_out_that_is_a_file(capsys, slides, tmp_path):
    (tmp_path / "f").write_text("x")
    _exit_2(capsys, ["--slides", str(slides), "--out", str(tmp_path / "f")], "is a file")


def test_zero_byte_manifest(capsys, tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    _exit_2(capsys, ["--slides", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "out")], "is empty")


@pytest.mark.parametrize("name,content,match", [
    ("config.yaml", b"model: vit_large\nlr: 0.001\n", "not the config of a tiling run"),
    ("config.yaml", b"\x00\x01 {[ not yaml", "not YAML"),
    ("manifest.parquet", b"PAR1 truncated", "not a readable run manifest"),
])
def test_foreign_or_broken_files_in_out(capsys, slides, tmp_path, name, content, match):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).write_bytes(content)
    _exit_2(capsys, ["--slides", str(slides), "--out", str(tmp_path / "out")], match)
    assert (tmp_path / "out" / name).read_bytes() == content  # refused, not overwritten


def test_metrics_port_in_use(capsys, slides, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        _exit_2(capsys, ["--slides", str(slides), "--out", str(tmp_path / "out"), "--metrics-port", str(port)],
                f"127.0.0.1:{port}")


@pytest.mark.parametrize("option", [["--set", "readers=[]"], ["--tile-px", "100000"]])
def test_settings_that_cannot_tile(capsys, slides, tmp_path, option):
    _exit_2(capsys, ["--slides", str(slides), "--out", str(tmp_path / "out"), *option], "invalid value")


def test_second_run_into_the_same_out_names_the_holder(capsys, slides, tmp_path):
    """Issue 10.3: the lock is taken before anything in --out is read or cleaned."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards" / ".tmp").mkdir(parents=True)
    (out / "shards" / ".tmp" / ("0" * 32 + ".tar")).write_bytes(b"the other run's shard, being written")
    with OutputLock(str(out), "tile"):
        _exit_2(capsys, ["--slides", str(slides), "--out", str(out)], "is in use by `gpfm-scale tile` (pid")
    assert (out / "shards" / ".tmp" / ("0" * 32 + ".tar")).exists()
    assert not (out / "manifest.parquet").exists()
