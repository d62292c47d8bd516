"""Names that come from data and become paths: slide ids, tar keys, class folders, manifest columns.

Every stage builds file names from data it did not write (a manifest's slide_id, a shard member's key, an image
folder's class names). One rule, here, keeps each such name a single path component inside its directory: `safe_id`
maps a free-form name to `[A-Za-z0-9._-]` (the tiler's slide ids, WebDataset-key safe); `checked_component`
refuses, rather than repairs, a name read back from our own outputs, where a change would silently mismatch.
"""

from __future__ import annotations

import os
import re

from gpfm_scale.errors import UnsafeNameError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_BYTES = 200  # leaves room for suffixes such as ".h5" / ".partial" under the common 255-byte name limit


def safe_id(name: str) -> str:
    """File- and WebDataset-key-safe id: anything outside [A-Za-z0-9._-] becomes '_'.

    '.' and '..' (and the empty string) have no safe spelling that keeps them distinct, so they are refused.
    """
    cleaned = _UNSAFE.sub("_", str(name))
    return checked_component(cleaned, "id")


def checked_component(name: str, what: str = "name") -> str:
    """`name` unchanged if it is one harmless path component, else UnsafeNameError naming it."""
    if not isinstance(name, str) or not name:
        raise UnsafeNameError(f"empty {what}")
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
        raise UnsafeNameError(f"unsafe {what} {name!r}: it must be one path component, not hidden and not '.'/'..'")
    if len(name.encode()) > _MAX_BYTES:
        raise UnsafeNameError(f"{what} {name[:40]!r}... is longer than {_MAX_BYTES} bytes")
    return name


def child_path(root: str, *parts: str) -> str:
    """`root/part/...` after checking each part, and that the result stays under `root` (symlinks resolved)."""
    for p in parts:
        checked_component(p, "path component")
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise UnsafeNameError(f"{os.path.join(*parts)!r} resolves outside {root}")
    return path
