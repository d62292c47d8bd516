"""One run per output directory; the refused one names the holder (issue 10.3)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gpfm_scale.errors import ConfigError, OutputLockedError
from gpfm_scale.run_lock import OutputLock


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    with OutputLock(str(tmp_path), "tile"):
        with pytest.raises(OutputLockedError, match=r"gpfm-scale tile.*pid"):
            OutputLock(str(tmp_path), "embed").acquire()
    with OutputLock(str(tmp_path), "embed"):  # released on exit
        pass


def test_lock_held_by_another_process_and_dropped_when_it_dies(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from gpfm_scale.run_lock import OutputLock
        OutputLock({str(tmp_path)!r}, "pretrain").acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match="pretrain"):
            OutputLock(str(tmp_path), "tile").acquire()
    finally:
        proc.kill()
        proc.wait()
    OutputLock(str(tmp_path), "tile").acquire().release()


def test_out_that_is_a_file_is_a_config_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        OutputLock(str(f), "tile").acquire()


def test_remote_lease(tmp_path):
    url = "memory://gpfm-lock-test/out"
    with OutputLock(url, "tile"):
        with pytest.raises(OutputLockedError, match="delete"):
            OutputLock(url, "tile").acquire()
    OutputLock(url, "tile").acquire().release()
