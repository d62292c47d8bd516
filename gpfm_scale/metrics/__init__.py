"""Prometheus metrics of every stage, defined once (names follow `gpfm_<stage>_<what>_<unit>`)."""

from gpfm_scale.metrics.definitions import PRETRAIN, REGISTRY, TILING, serve_metrics

__all__ = ["PRETRAIN", "REGISTRY", "TILING", "serve_metrics"]
