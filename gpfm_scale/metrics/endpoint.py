"""The driver's Prometheus endpoint (the `driver` metrics of the catalogue)."""

from __future__ import annotations

import logging
import threading

from prometheus_client import start_http_server

from gpfm_scale.errors import ConfigError
from gpfm_scale.metrics.definitions import DRIVER_REGISTRY

log = logging.getLogger(__name__)

_SERVING: dict[tuple[str, int], int] = {}
_LOCK = threading.Lock()


def serve_metrics(port: int, addr: str = "127.0.0.1") -> int:
    """Start the HTTP exposition endpoint (port 0 picks a free one); returns the bound port.

    Localhost by default: the endpoint has no authentication. On a cluster, bind the head's address (or 0.0.0.0
    behind a firewall) so that the Prometheus server can scrape it. A second call for the same address and port
    in one process (a notebook or script running several stages) keeps the endpoint it already has: the counters
    are process-wide, so one endpoint shows them all. A port already taken (or an address this host does not have)
    is a ConfigError naming it (exit 2), not a traceback."""
    with _LOCK:
        if port and (addr, port) in _SERVING:
            return _SERVING[(addr, port)]
        try:
            server, _thread = start_http_server(port, addr=addr, registry=DRIVER_REGISTRY)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {addr}:{port}: {err.strerror or err}; choose another "
                              "--metrics-port (or metrics_port: null)") from None
        bound = server.server_address[1]
        _SERVING[(addr, port or bound)] = bound
    log.info("Prometheus metrics on http://%s:%d/metrics", addr, bound)
    return bound
