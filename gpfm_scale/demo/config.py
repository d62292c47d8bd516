"""Every knob of `gpfm-scale demo`, with the defaults that make `make demo` take a few minutes on 2 CPU cores.

The integration test runs the same code with a smaller `DemoConfig` (fewer slides, steps and patches). The
stage configs themselves are not repeated here: the demo builds them from these values (`demo/stages.py`), with
the pretraining recipe read from `gpfm_scale/configs/tiny.yaml` (the tiny ViT and the tiny experts tiny_a/tiny_b).
The tiling is the tiler's own settings (`tiling`), which also give the synthetic slides their tile size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field, field_validator

from gpfm_scale.config import StrictModel
from gpfm_scale.tiling.config import TilingSettings

TISSUE_CLASSES = ("tumour_like", "stroma_like", "fibre_like")
"""Names of the synthetic tissue classes, in the order of the synthetic slides' textures: dense purple nuclei,
pink fibrous stripes with few nuclei, reddish oblique fibres with medium nuclei (slides/_synthetic_content.py)."""

DEMO_TILING: dict[str, Any] = {"grid": {"tile_px": 224, "target_mpp": 0.5, "max_tiles_per_slide": 200}}
"""The demo's tiling as differences from the tiler's defaults: 224-px tiles at 0.5 µm/px (20x: the synthetic slides'
level 0, written in tiles of `grid.tile_px`, so their tiles are copied without decoding), at most 200 per slide."""


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on top, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], value) if nested else value
    return out


class DemoConfig(StrictModel):
    moved_keys: ClassVar[Mapping[str, str]] = {"tile_px": "tiling.grid.tile_px",
                                                "max_tiles_per_slide": "tiling.grid.max_tiles_per_slide"}

    n_synthetic_slides: int = Field(
        default=4, ge=2, description="Synthetic slides (every one holds all tissue classes); the last one is the test "
        "slide of the synthetic-tissue task, the others train.")
    slide_width: int = Field(default=4096, ge=512, description="Synthetic slide width, level-0 px.")
    slide_height: int = Field(default=3072, ge=512, description="Synthetic slide height, level-0 px.")
    slide_mpp: float = Field(
        default=0.5, gt=0,
        description="µm/px of the synthetic slides' level 0 (0.5: 20x, so tiles are copied without decoding).")
    tissue_classes: list[str] = Field(
        default=list(TISSUE_CLASSES), min_length=2, max_length=3, description="Tissue class names (2 or 3).")
    include_real_slide: bool = Field(
        default=True, description="Also tile the real CMU-1 SVS from the shared data folder (pretraining data only).")
    tiling: TilingSettings = Field(
        default_factory=lambda: TilingSettings.model_validate(DEMO_TILING),
        description="The tiler's settings (DEMO_TILING over its defaults; a partial mapping changes only the keys it "
        "names); the synthetic slides are written in tiles of grid.tile_px.")
    pretrain_steps: int = Field(default=40, ge=1, description="Optimiser steps of the tiny pretraining run.")
    pretrain_workers: int = Field(default=1, ge=1, description="Ray Train workers (1 CPU each).")
    patches_per_class: int | None = Field(
        default=300, ge=5,
        description="Labelled patches kept per class and dataset (seeded choice); null: all of them.")
    min_class_fraction: float = Field(
        default=0.8, gt=0.5, le=1, description="A synthetic tile is labelled only when one class covers at least this "
        "fraction of its tissue pixels (mixed tiles are left out of the synthetic-tissue task).")
    use_hgsc: bool = Field(
        default=True, description="Evaluate on the real hgsc-nuclei patches from the shared data folder when present.")
    tasks: list[str] = Field(default=["linear-probe", "knn"], min_length=1, description="Evaluation tasks per dataset.")
    bootstrap: int = Field(default=200, ge=0, description="Bootstrap resamples for the 95% intervals (0: none).")
    batch_size: int = Field(default=128, ge=1, description="Images per forward pass when embedding.")
    seed: int = Field(
        default=0, ge=0, description="Seeds slides, patch subsets, pretraining and evaluation (the tile sampling "
        "has its own: tiling.grid.seed).")
    data_dir: str | None = Field(
        default=None, description="The shared real-data folder; default: GPFM_DATA_DIR, else ../shared/data.")

    @field_validator("tiling", mode="before")
    @classmethod
    def _over_demo_tiling(cls, value: object) -> object:
        """{"grid": {"max_tiles_per_slide": 40}} keeps the demo's 224-px tiles, not the tiler's 512-px default."""
        return _merged(DEMO_TILING, value) if isinstance(value, Mapping) else value
