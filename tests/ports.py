"""One helper for every test that needs a TCP port on loopback (the Ray head's ports, torch.distributed's)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port that was free a moment ago: bound, read and released (the caller binds it again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
