"""Prometheus metrics of every stage, defined once (names follow `gpfm_<stage>_<what>_<unit>`)."""

from gpfm_scale.metrics.definitions import EMBED, PRETRAIN, REGISTRY, TILING, serve_metrics

__all__ = ["EMBED", "PRETRAIN", "REGISTRY", "TILING", "serve_metrics"]
