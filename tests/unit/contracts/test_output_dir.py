"""The tiling output directory: files published with the umask's mode, and only our temporary files cleared."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from gpfm_scale.contracts.output_dir import OutputDir


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_published_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask):
    """Issue 10.11: manifest/config (write_bytes_atomic) and coords/thumbnails (mkstemp + publish)."""
    out = OutputDir(str(tmp_path))
    out.makedirs()
    out.write_bytes_atomic(b"x", "manifest.parquet")
    fd, tmp = tempfile.mkstemp(suffix=".h5", dir=out.local_tmp_dir())
    os.close(fd)
    out.publish(tmp, "coords", "s.h5")
    assert _mode(tmp_path / "manifest.parquet") == 0o666 & ~umask
    assert _mode(tmp_path / "coords" / "s.h5") == 0o666 & ~umask


def test_clear_tmp_removes_only_our_temporary_files(tmp_path):
    out = OutputDir(str(tmp_path))
    out.makedirs()
    tmp = tmp_path / "shards" / ".tmp"
    ours = ["0123456789abcdef0123456789abcdef.tar", "tmpab_12x9.h5", "tmpzz81q0aa.png",
            "0123456789abcdef0123456789abcdef.tar.partial"]
    theirs = ["notes.txt", "keep-000001.tar"]
    for name in ours + theirs:
        (tmp / name).write_bytes(b"x")
    assert out.clear_tmp() == len(ours)
    assert sorted(p.name for p in tmp.iterdir()) == sorted(theirs)
