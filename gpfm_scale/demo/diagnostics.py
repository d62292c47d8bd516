"""Numbers that explain the comparison rather than score it: how far training moved the teacher, how much its
LayerScale gains grew, and how much each model's features vary from patch to patch.

Why they matter at demo scale: the GPFM recipe starts LayerScale at 1e-5, so at step 0 every block adds ~1e-5 of
its output to the residual stream and the CLS feature hardly depends on the image. `embed` stores features as
float16 (resolution 2^-10 ~ 1e-3 of a value), below that variation, so a step-0 teacher's stored features are
mostly rounding. A few dozen steps grow the gains, and the features become image-dependent: the report says how
much, so a reader can tell that effect from learned tissue features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from gpfm_scale.contracts.export import WEIGHTS_FILE
from gpfm_scale.contracts.features import load_image_features

FLOAT16_RESOLUTION = 2.0**-10
"""Relative spacing of float16 values (10-bit mantissa): smaller relative differences do not survive storage."""


def _weights(export_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(export_dir / WEIGHTS_FILE)).items()}


def weight_change(trained: Path, init: Path) -> float:
    """||θ_trained - θ_init|| / ||θ_init|| over every tensor of two exported teachers (same keys)."""
    a, b = _weights(trained), _weights(init)
    diff = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b)
    norm = sum(float(np.sum(b[k] ** 2)) for k in b)
    return (diff / norm) ** 0.5 if norm > 0 else float("nan")


def layerscale_gain(export_dir: Path) -> float | None:
    """Mean |gamma| of the LayerScale parameters (timm names them `*.gamma`); None without LayerScale."""
    gammas = [np.abs(v).ravel() for k, v in _weights(export_dir).items() if k.endswith(".gamma")]
    return float(np.concatenate(gammas).mean()) if gammas else None


def feature_spread(features_dir: Path) -> float:
    """How much stored features vary across patches relative to their size: mean over dims of the std over
    patches, divided by the mean |value| (0: every patch has the same features)."""
    features, _ = load_image_features(features_dir)
    x = features.astype(np.float64)
    scale = float(np.abs(x).mean())
    return float(x.std(axis=0).mean()) / scale if scale > 0 else 0.0
