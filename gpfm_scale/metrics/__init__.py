"""Prometheus metrics of every stage, defined once (names follow `gpfm_<stage>_<what>_<unit>`)."""

from gpfm_scale.metrics.definitions import REGISTRY, TILING, serve_metrics

__all__ = ["REGISTRY", "TILING", "serve_metrics"]
