"""Every metric of gpfm-scale with its help text and unit, in one module.

Rules (Prometheus naming): one `gpfm_` prefix, base units (seconds, bytes), `_total` for counters, and no
unbounded labels (never a slide id). The driver process owns these; `serve_metrics` exposes them over HTTP on a
documented port bound to localhost by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
DEFAULT_PORT = 9464


@dataclass(frozen=True)
class TilingMetrics:
    tiles_written: Counter
    bytes_written: Counter
    slides: Counter
    tiles_per_second: Gauge
    worker_restarts: Counter
    shards_written: Counter


TILING = TilingMetrics(
    tiles_written=Counter("gpfm_tiling_tiles_written", "Tiles written into committed shards.", registry=REGISTRY),
    bytes_written=Counter("gpfm_tiling_written_bytes", "Bytes of committed shards.", registry=REGISTRY),
    slides=Counter("gpfm_tiling_slides", "Slides finished, by status (done, failed).", ["status"], registry=REGISTRY),
    tiles_per_second=Gauge("gpfm_tiling_tiles_per_second", "Tiles written per second over the run so far.",
                           registry=REGISTRY),
    worker_restarts=Counter("gpfm_tiling_worker_restarts", "Tiling actors lost and restarted.", registry=REGISTRY),
    shards_written=Counter("gpfm_tiling_shards_written", "Shards committed.", registry=REGISTRY),
)


@dataclass(frozen=True)
class PretrainMetrics:
    step: Gauge
    step_seconds: Gauge
    data_wait_seconds: Gauge
    expert_wait_seconds: Gauge
    images_per_second: Gauge
    worker_images_per_second: Gauge
    loss: Gauge
    lr: Gauge
    momentum: Gauge
    teacher_temperature: Gauge
    corrupt_samples: Counter


PRETRAIN = PretrainMetrics(
    step=Gauge("gpfm_pretrain_step", "Last optimiser step completed.", registry=REGISTRY),
    step_seconds=Gauge("gpfm_pretrain_step_seconds", "Wall time of the last step on rank 0.", registry=REGISTRY),
    data_wait_seconds=Gauge("gpfm_pretrain_data_wait_seconds", "Time the last step waited for its batch.",
                            registry=REGISTRY),
    expert_wait_seconds=Gauge("gpfm_pretrain_expert_wait_seconds",
                              "Time the last step waited for expert targets.", registry=REGISTRY),
    images_per_second=Gauge("gpfm_pretrain_images_per_second", "Images per second, all workers.",
                            registry=REGISTRY),
    worker_images_per_second=Gauge("gpfm_pretrain_worker_images_per_second", "Images per second on rank 0.",
                                   registry=REGISTRY),
    loss=Gauge("gpfm_pretrain_loss", "Loss terms of the last step.", ["term"], registry=REGISTRY),
    lr=Gauge("gpfm_pretrain_learning_rate", "Learning rate (before per-group multipliers).", registry=REGISTRY),
    momentum=Gauge("gpfm_pretrain_teacher_momentum", "EMA momentum of the teacher.", registry=REGISTRY),
    teacher_temperature=Gauge("gpfm_pretrain_teacher_temperature", "Teacher softmax temperature.",
                              registry=REGISTRY),
    corrupt_samples=Counter("gpfm_pretrain_corrupt_samples", "Samples skipped as undecodable.", registry=REGISTRY),
)



@dataclass(frozen=True)
class EmbedMetrics:
    images: Counter
    images_per_second: Gauge
    slides: Counter
    corrupt_samples: Counter


EMBED = EmbedMetrics(
    images=Counter("gpfm_embed_images", "Images (tiles) embedded.", registry=REGISTRY),
    images_per_second=Gauge("gpfm_embed_images_per_second", "Images embedded per second over the run so far.",
                            registry=REGISTRY),
    slides=Counter("gpfm_embed_slides", "Slides finished, by status (done, skipped, failed).", ["status"],
                   registry=REGISTRY),
    corrupt_samples=Counter("gpfm_embed_corrupt_samples", "Tiles or images skipped as undecodable.",
                            registry=REGISTRY),
)

def serve_metrics(port: int, addr: str = "127.0.0.1") -> int:
    """Start the HTTP exposition endpoint (port 0 picks a free one); returns the bound port."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    bound = server.server_address[1]
    log.info("Prometheus metrics on http://%s:%d/metrics", addr, bound)
    return bound
