"""`gpfm-scale embed` refuses before any work, with exit 2 and one line, what used to end in a traceback or in a
second run corrupting the first: a busy, unwritable or non-directory --out, a metrics port in use."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpfm_scale.cli import main
from gpfm_scale.run_lock import OutputLock


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "x.png")
    return folder.parent


def _embed(images: Path, out: Path, *extra: str) -> int:
    return main(["embed", "--model", "expert:tiny_a", "--input", str(images), "--out", str(out), *extra])


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpfm-scale embed: error: ")
    return lines[0]


def test_a_second_run_into_one_out_exits_2_naming_the_holder(images, tmp_path, capsys):
    with OutputLock(str(tmp_path / "out"), "embed"):
        assert _embed(images, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert "in use by `gpfm-scale embed`" in line and f"pid {os.getpid()}" in line
    assert not (tmp_path / "out" / "embed.json").exists()  # nothing of the holder's output touched


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_unusable_out_exits_2_with_one_line(images, tmp_path, capsys, where):
    (tmp_path / "plain").write_text("x")
    out = {"file": tmp_path / "plain", "under_file": tmp_path / "plain" / "out", "proc": Path("/proc/gpfm-out")}[where]
    assert _embed(images, out) == 2
    assert str(out) in _one_error_line(capsys)


def test_metrics_port_in_use_exits_2_with_one_line(images, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _embed(images, tmp_path / "out", "--metrics-port", str(port)) == 2
    assert str(port) in _one_error_line(capsys)


def test_tiler_manifest_rows_with_unsafe_slide_ids_or_shard_names_fail_alone(tmp_path):
    import pandas as pd

    from gpfm_scale.embed.config import EmbedConfig
    from gpfm_scale.embed.inputs import TileSource
    from gpfm_scale.embed.models import describe_model
    from gpfm_scale.embed.stage import _plan_slides

    manifest = pd.DataFrame({"slide_id": ["..", "ok", "evil", ".hidden"], "status": ["done"] * 4,
                             "n_tiles": [2, 2, 2, 2], "reason": [""] * 4,
                             "shards": [["s0.tar"], ["s0.tar"], ["../../elsewhere.tar"], ["s0.tar"]]})
    source = TileSource([str(tmp_path / "shards" / "s0.tar")], manifest, [], str(tmp_path))
    plan = _plan_slides(source, describe_model("expert:tiny_a", EmbedConfig()), tmp_path / "out")
    assert plan.todo == {str(tmp_path / "shards" / "s0.tar"): ["ok"]} and plan.expected == {"ok": 2}
    failed = {f["slide_id"]: f["reason"] for f in plan.failed}
    assert set(failed) == {"..", "evil", ".hidden"} and "shard name" in failed["evil"]
    assert all(f["stage"] == "embedding" for f in plan.failed)


def test_the_feature_writer_refuses_a_slide_id_that_is_not_one_component(tmp_path):
    from gpfm_scale.contracts.features import write_slide_features
    from gpfm_scale.errors import UnsafeNameError

    for sid in ("../x", "..", "a/b", ""):
        with pytest.raises(UnsafeNameError):
            write_slide_features(tmp_path, sid, np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int64), "m")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_stage_alone_refuses_slides_it_has_no_tiler_for(tmp_path):
    """Slides reach the embedding stage only with a tiler handed in (`embed_command` passes the tiling stage): the
    stage itself does not import another stage, and refuses before locking or writing --out."""
    from gpfm_scale.embed.config import EmbedConfig
    from gpfm_scale.embed.stage import run
    from gpfm_scale.errors import ConfigError

    (tmp_path / "wsi").mkdir()
    (tmp_path / "wsi" / "a.svs").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="must be tiled first"):
        run(EmbedConfig(), "expert:tiny_a", str(tmp_path / "wsi"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
