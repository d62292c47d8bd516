"""Every metric of gpfm-scale with its help text, unit and labels, in one module: the catalogue.

Rules (Prometheus naming): one `gpfm_` prefix, base units (seconds, bytes), counters exposed with `_total`, and
no unbounded labels (never a slide id; `rank` is bounded by the number of training workers).

Each metric is recorded in exactly one kind of process, which decides how Prometheus reaches it:
- `driver`: the stage's driver sees every committed shard or finished batch (tiling, embedding). These are
  prometheus_client objects in `DRIVER_REGISTRY`, served over HTTP by `serve_metrics` (127.0.0.1:9464 by default).
- `ray_worker`: measured inside Ray workers, which may be many per node on any node (pretraining ranks). They go
  through Ray's own per-node metrics agent (`ray_agent.AgentRecorder`): no port to allocate per process, and Ray
  writes the service-discovery file Prometheus reads (`/tmp/ray/prom_metrics_service_discovery.json`). Ray
  exports them as `ray_<name>`; cluster/prometheus/prometheus.yml strips the prefix, so a metric has one name in
  Prometheus whichever process recorded it.
`CATALOGUE` lists both kinds: docs, the Grafana dashboard test and the end-to-end scrape tests read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

Kind = Literal["counter", "gauge"]
RecordedIn = Literal["driver", "ray_worker"]

DRIVER_REGISTRY = CollectorRegistry(auto_describe=True)
DEFAULT_PORT = 9464


@dataclass(frozen=True)
class MetricSpec:
    """One metric: `name` without the `_total` that Prometheus adds to counters."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    recorded_in: RecordedIn = "driver"

    @property
    def exposed_name(self) -> str:
        """The sample name a scrape shows (and a dashboard queries)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


CATALOGUE: list[MetricSpec] = []


def _spec(name: str, kind: Kind, help_text: str, labels: tuple[str, ...] = (),
          recorded_in: RecordedIn = "driver") -> MetricSpec:
    spec = MetricSpec(name, kind, help_text, labels, recorded_in)
    if any(s.name == name for s in CATALOGUE):
        raise ValueError(f"metric {name} defined twice")
    CATALOGUE.append(spec)
    return spec


def _driver(name: str, kind: Kind, help_text: str, labels: tuple[str, ...] = ()) -> Counter | Gauge:
    spec = _spec(name, kind, help_text, labels)
    cls = Counter if kind == "counter" else Gauge
    return cls(spec.name, spec.help, spec.labels, registry=DRIVER_REGISTRY)


def _worker(name: str, kind: Kind, help_text: str, labels: tuple[str, ...] = ()) -> MetricSpec:
    return _spec(name, kind, help_text, labels, recorded_in="ray_worker")


@dataclass(frozen=True)
class TilingMetrics:
    tiles_written: Counter
    bytes_written: Counter
    slides: Counter
    tiles_per_second: Gauge
    worker_restarts: Counter
    shards_written: Counter


TILING = TilingMetrics(
    tiles_written=_driver("gpfm_tiling_tiles_written", "counter", "Tiles written into committed shards."),
    bytes_written=_driver("gpfm_tiling_written_bytes", "counter", "Bytes of committed shards."),
    slides=_driver("gpfm_tiling_slides", "counter", "Slides finished, by status (done, failed).", ("status",)),
    tiles_per_second=_driver("gpfm_tiling_tiles_per_second", "gauge", "Tiles written per second over the run so far."),
    worker_restarts=_driver("gpfm_tiling_worker_restarts", "counter", "Tiling actors lost and restarted."),
    shards_written=_driver("gpfm_tiling_shards_written", "counter", "Shards committed."),
)


@dataclass(frozen=True)
class PretrainMetrics:
    step: MetricSpec
    step_seconds: MetricSpec
    data_wait_seconds: MetricSpec
    expert_wait_seconds: MetricSpec
    images_per_second: MetricSpec
    worker_images_per_second: MetricSpec
    loss: MetricSpec
    lr: MetricSpec
    momentum: MetricSpec
    teacher_temperature: MetricSpec
    corrupt_samples: MetricSpec
    damaged_shards: MetricSpec


PRETRAIN = PretrainMetrics(
    step=_worker("gpfm_pretrain_step", "gauge", "Last optimiser step completed (rank 0)."),
    step_seconds=_worker("gpfm_pretrain_step_seconds", "gauge", "Wall time of the last reported step.", ("rank",)),
    data_wait_seconds=_worker("gpfm_pretrain_data_wait_seconds", "gauge",
                              "Time the last reported step waited for its batch.", ("rank",)),
    expert_wait_seconds=_worker("gpfm_pretrain_expert_wait_seconds", "gauge",
                                "Time the last reported step waited for expert targets.", ("rank",)),
    images_per_second=_worker("gpfm_pretrain_images_per_second", "gauge",
                              "Images per second, all workers (rank 0's rate x world size)."),
    worker_images_per_second=_worker("gpfm_pretrain_worker_images_per_second", "gauge",
                                     "Images per second of one worker.", ("rank",)),
    loss=_worker("gpfm_pretrain_loss", "gauge", "Loss terms of the last reported step (rank 0).", ("term",)),
    lr=_worker("gpfm_pretrain_learning_rate", "gauge", "Learning rate (before per-group multipliers)."),
    momentum=_worker("gpfm_pretrain_teacher_momentum", "gauge", "EMA momentum of the teacher."),
    teacher_temperature=_worker("gpfm_pretrain_teacher_temperature", "gauge", "Teacher softmax temperature."),
    corrupt_samples=_worker("gpfm_pretrain_corrupt_samples", "counter", "Samples skipped as undecodable.",
                            ("rank",)),
    damaged_shards=_worker("gpfm_pretrain_damaged_shards", "counter",
                           "Shards found truncated or malformed (their samples before the damage were used).",
                           ("rank",)),
)


@dataclass(frozen=True)
class EmbedMetrics:
    images: Counter
    images_per_second: Gauge
    slides: Counter
    corrupt_samples: Counter


EMBED = EmbedMetrics(
    images=_driver("gpfm_embed_images", "counter", "Images (tiles) embedded."),
    images_per_second=_driver("gpfm_embed_images_per_second", "gauge",
                              "Images embedded per second over the run so far."),
    slides=_driver("gpfm_embed_slides", "counter", "Slides finished, by status (done, skipped, failed).",
                   ("status",)),
    corrupt_samples=_driver("gpfm_embed_corrupt_samples", "counter", "Tiles or images skipped as undecodable."),
)
