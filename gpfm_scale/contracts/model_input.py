"""The model input contract: the square size a model takes and the mean/std it normalises with.

One definition for the three places that state it: an expert's spec (`models.experts.ExpertSpec`), an export's
`config.json` (`contracts.export`, written from the pretraining run's `crops.mean`/`crops.std`) and what `embed`
feeds a model (`embed.models`). Pixels are scaled to [0, 1] first, then `(x - mean) / std` per RGB channel.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputContract:
    """What a model wants: square `size` px RGB, normalised with `mean`/`std` after scaling to [0, 1]."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
