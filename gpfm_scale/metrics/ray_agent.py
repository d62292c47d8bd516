"""Recording catalogue metrics from inside Ray workers and actors, through Ray's per-node metrics agent.

Ray exports what `ray.util.metrics` records on the node's metrics agent (`ray start --metrics-export-port`), every
`metrics_report_interval_ms` (10 s by default), named `ray_<name>` with Ray's own labels added (SessionName,
NodeAddress, WorkerId, ...). The Ray metric objects are created on first use in the recording process: they
cannot be pickled into a worker, and a process that records nothing registers nothing.
"""

from __future__ import annotations

from typing import Any

from gpfm_scale.metrics.definitions import MetricSpec


class AgentRecorder:
    """Sets gauges and increments counters of the catalogue from one Ray process."""

    def __init__(self) -> None:
        self._twins: dict[str, Any] = {}

    def _twin(self, spec: MetricSpec, kind: str) -> Any:
        if spec.recorded_in != "ray_worker":
            raise ValueError(f"{spec.name} is a driver metric: record it with its prometheus_client object")
        if spec.kind != kind:
            raise TypeError(f"{spec.name} is a {spec.kind}, not a {kind}")
        twin = self._twins.get(spec.name)
        if twin is None:
            from ray.util import metrics

            cls = metrics.Counter if spec.kind == "counter" else metrics.Gauge
            twin = self._twins[spec.name] = cls(spec.name, description=spec.help, tag_keys=spec.labels)
        return twin

    @staticmethod
    def _tags(spec: MetricSpec, labels: dict[str, str]) -> dict[str, str] | None:
        if set(labels) != set(spec.labels):
            raise ValueError(f"{spec.name} takes labels {list(spec.labels)}, got {sorted(labels)}")
        return labels or None

    def set(self, spec: MetricSpec, value: float, **labels: str) -> None:
        self._twin(spec, "gauge").set(float(value), tags=self._tags(spec, labels))

    def inc(self, spec: MetricSpec, value: float = 1.0, **labels: str) -> None:
        if value > 0:  # Ray refuses a zero increment
            self._twin(spec, "counter").inc(float(value), tags=self._tags(spec, labels))
