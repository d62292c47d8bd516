"""local_copy: local paths pass through; fsspec URLs (memory:// here) are staged to a temp file and removed."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from gpfm_scale.errors import SlideReadError
from gpfm_scale.slides.open import open_slide
from gpfm_scale.slides.staging import local_copy
from gpfm_scale.slides.synthetic import write_synthetic_slide


@pytest.fixture()
def memory_slide(tmp_path):
    info = write_synthetic_slide(tmp_path / "src.svs", 512, 384, levels=2, seed=5)
    data = Path(info.path).read_bytes()
    url = "memory://bucket/cohort/slide-01.svs"
    fs = fsspec.filesystem("memory")
    with fs.open(url, "wb") as f:
        f.write(data)
    yield url, data
    fs.rm(url)


def test_local_paths_pass_through(tmp_path):
    path = str(tmp_path / "a.svs")
    with local_copy(path, cache_dir=str(tmp_path / "cache")) as got:
        assert got == path
    with local_copy(f"file://{path}", cache_dir=None) as got:
        assert got == path
    assert not (tmp_path / "cache").exists()  # nothing staged, nothing created


def test_memory_url_is_staged_and_removed(tmp_path, memory_slide):
    url, data = memory_slide
    cache = tmp_path / "cache"
    with local_copy(url, cache_dir=str(cache)) as path:
        assert os.path.dirname(path) == str(cache) and path.endswith(".svs")
        assert Path(path).read_bytes() == data
        with open_slide(path) as reader:
            assert reader.level_dimensions[0] == (512, 384)
    assert not os.path.exists(path)
    assert os.listdir(cache) == []


def test_staged_copy_removed_on_error(tmp_path, memory_slide):
    url, _ = memory_slide
    with pytest.raises(RuntimeError, match="boom"), local_copy(url, cache_dir=str(tmp_path)) as path:
        raise RuntimeError("boom")
    assert not os.path.exists(path)


def test_missing_remote_file(tmp_path):
    missing = "memory://nowhere/x.svs"
    with pytest.raises(SlideReadError, match=f"{missing}: no such remote file"), local_copy(missing, str(tmp_path)):
        pass
    assert os.listdir(tmp_path) == []


def test_unknown_protocol(tmp_path):
    with pytest.raises(SlideReadError, match="cannot stage"), local_copy("nosuchproto://bucket/x.svs", str(tmp_path)):
        pass
