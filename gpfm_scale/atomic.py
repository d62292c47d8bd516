"""Writing local files whole and with the permissions users expect.

`tempfile.mkstemp` creates files mode 0600 whatever the umask; renamed into place they stay unreadable to the rest
of a lab's group on a shared filesystem. Every file we publish goes through here: written under a temporary name
in the destination's directory (so the rename is atomic), fsynced, given the mode `open()` would have given it
(0666 minus the umask), then renamed.
"""

from __future__ import annotations

import os
import tempfile
import threading

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it; the lock keeps threads from seeing the interim value)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    return 0o666 & ~current_umask()


def apply_default_mode(path: str) -> None:
    """Give a file made by mkstemp (0600) the mode a plain `open(path, 'w')` would have given it."""
    os.chmod(path, default_file_mode())


def write_bytes_atomic(dest: str, data: bytes) -> None:
    """Write `data` to `dest` so that readers see the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        apply_default_mode(tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def replace_into_place(tmp: str, dest: str) -> None:
    """Rename a finished temporary file (from mkstemp) to `dest` with the default mode."""
    apply_default_mode(tmp)
    os.replace(tmp, dest)


def save_safetensors_atomic(state: dict, dest: str) -> None:
    """`safetensors.torch.save_file` whole under a temporary name, published with the umask's mode (safetensors
    alone leaves 0600). `state`: name -> CPU tensor."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=".", suffix=".partial")
    os.close(fd)
    try:
        save_file(state, tmp)
        replace_into_place(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
