"""Published files get the umask's mode, not mkstemp's 0600 (issue 10.11)."""

from __future__ import annotations

import os
import stat

from gpfm_scale.atomic import write_bytes_atomic


def test_write_bytes_atomic_respects_umask(tmp_path):
    old = os.umask(0o002)
    try:
        write_bytes_atomic(str(tmp_path / "a.bin"), b"abc")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
