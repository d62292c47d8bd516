"""MPP resolution order (manifest > slide > config) and the error when nothing is known."""

from __future__ import annotations

import math

import pytest

from gpfm_scale.errors import MissingMppError, SlideReadError
from gpfm_scale.slides.mpp import magnification_from_mpp, resolve_mpp


@pytest.mark.parametrize(
    "slide,manifest,fallback,expected",
    [
        (0.25, 0.5, 1.0, (0.5, "manifest")),  # the manifest corrects bad metadata
        (0.25, None, 1.0, (0.25, "slide")),
        (None, None, 1.0, (1.0, "config")),
        (0.25, math.nan, None, (0.25, "slide")),  # pandas gives NaN for an empty cell
        (0.0, -1.0, 0.46, (0.46, "config")),  # zero and negative are absent, not values
        (math.inf, None, 0.46, (0.46, "config")),
    ],
)
def test_order(slide, manifest, fallback, expected):
    assert resolve_mpp(slide, manifest, fallback, "s1") == expected


def test_missing_everywhere_names_slide_and_places():
    with pytest.raises(MissingMppError) as err:
        resolve_mpp(None, math.nan, None, "TCGA-01")
    message = str(err.value)
    assert "TCGA-01" in message
    for place in ("manifest", "metadata", "config"):
        assert place in message
    assert isinstance(err.value, SlideReadError)  # a per-slide failure, recorded like unreadable slides


@pytest.mark.parametrize("mpp,mag", [(0.25, 40.0), (0.5, 20.0), (1.0, 10.0), (0.2527, 10 / 0.2527)])
def test_magnification(mpp, mag):
    assert magnification_from_mpp(mpp) == pytest.approx(mag)


def test_magnification_rejects_nonsense():
    with pytest.raises(ValueError):
        magnification_from_mpp(0.0)
