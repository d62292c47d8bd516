"""Which microns-per-pixel a slide is tiled at, and where that number came from.

Order (decided for the project): an explicit manifest value wins, because users add an `mpp` column precisely to
correct slides whose metadata is wrong; then the slide's own metadata; then the config's fallback. Nothing found
is an error, never a silent guess: tiles at the wrong scale poison pretraining without any visible failure.
"""

from __future__ import annotations

import math

from gpfm_scale.errors import MissingMppError

MPP_SOURCES = ("manifest", "slide", "config")


def _usable(value: float | None) -> float | None:
    """The value as a float when it is a real positive number; None, NaN, inf, zero and negatives are 'absent'."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def parse_manifest_mpp(value: object) -> float | None:
    """A manifest's `mpp` cell as µm/px; None when the cell is empty (NaN, None, blank): "not given".

    Anything else must be a positive finite number, written plainly: '0.25um' or '0,25' raise ValueError with
    the value quoted rather than becoming NaN, which would quietly hand the slide to its (possibly wrong) metadata
    when the user wrote the column precisely to override it.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    problem = f"invalid mpp {value!r} in the manifest: expected a positive number of µm per pixel, e.g. 0.25"
    if isinstance(value, bool):
        raise ValueError(problem)
    try:
        number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(problem)
    return number


def resolve_mpp(
    slide_mpp: float | None, manifest_mpp: float | None, fallback_mpp: float | None, slide_id: str
) -> tuple[float, str]:
    """(µm per level-0 px, source) with source one of "manifest", "slide", "config"; see the module docstring.

    Raises MissingMppError naming the slide and the three places looked when none of them holds a usable value.
    """
    for value, source in ((manifest_mpp, "manifest"), (slide_mpp, "slide"), (fallback_mpp, "config")):
        usable = _usable(value)
        if usable is not None:
            return usable, source
    raise MissingMppError(
        f"slide {slide_id!r}: no microns-per-pixel found: not in the manifest's `mpp` column "
        f"(got {manifest_mpp!r}), not in the slide's metadata (got {slide_mpp!r}), and no fallback mpp in the "
        f"config (got {fallback_mpp!r}); add an `mpp` column to the manifest or set a fallback"
    )


def magnification_from_mpp(mpp: float) -> float:
    """Nominal objective magnification for an MPP: 10 / mpp (0.25 µm/px -> 40x, 0.5 -> 20x), the usual convention."""
    usable = _usable(mpp)
    if usable is None:
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    return 10.0 / usable
