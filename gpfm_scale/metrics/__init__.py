"""Prometheus metrics of every stage, defined once (names follow `gpfm_<stage>_<what>_<unit>`)."""

from gpfm_scale.metrics.definitions import (
    CATALOGUE,
    DEFAULT_PORT,
    DRIVER_REGISTRY,
    EMBED,
    PRETRAIN,
    TILING,
    MetricSpec,
)
from gpfm_scale.metrics.endpoint import serve_metrics
from gpfm_scale.metrics.ray_agent import AgentRecorder

__all__ = ["AgentRecorder", "CATALOGUE", "DEFAULT_PORT", "DRIVER_REGISTRY", "EMBED", "MetricSpec", "PRETRAIN",
           "TILING", "serve_metrics"]
