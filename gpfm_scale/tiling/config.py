"""Every setting of the tiling stage, with its default. YAML files and CLI options only state differences."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gpfm_scale.config import DriverSettings, StrictModel
from gpfm_scale.slides.config import GridConfig, TissueConfig

MAX_TILE_PX = 16384
"""Largest tile or stride side in output px. A 16384-px RGB tile is 768 MiB decoded; anything larger is a typo
(an extra zero) that would otherwise finish 'done' with 0 tiles on every slide smaller than the tile."""
MAX_OVERLAP = 16
"""Smallest stride is tile_px / MAX_OVERLAP: each axis then repeats a pixel in 16 tiles (256x the tiles of a
non-overlapping grid); a smaller stride is a units mix-up (level-0 px for output px), not a sampling choice."""


class TilingSettings(StrictModel):
    """What tiling does to each slide and with how many actors. The driver's Ray and metrics settings are not
    here: `TilingConfig` adds them for `gpfm-scale tile`, and `embed` hands down its own when it tiles a manifest."""

    grid: GridConfig = Field(default_factory=GridConfig, description="Tile size, resolution, stride and selection.")
    tissue: TissueConfig = Field(default_factory=TissueConfig, description="Tissue mask thresholds.")
    readers: list[Literal["cucim", "openslide", "tiffslide"]] = Field(
        default=["cucim", "openslide", "tiffslide"], min_length=1,
        description="Slide readers tried in order; the first that opens and reads the slide is used and recorded.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="cuCIM decode device: auto uses cuda when the worker was given a GPU.")
    fallback_mpp: float | None = Field(
        default=None, gt=0, description="µm/px used only when neither the manifest nor the slide gives one.")
    encoding: Literal["jpeg", "png"] = Field(
        default="jpeg", description="Tile encoding when tiles are decoded (png is lossless and ~10x bigger).")
    jpeg_quality: int = Field(default=90, ge=50, le=100, description="JPEG quality of re-encoded tiles.")
    zero_decode: bool = Field(
        default=True, description="Copy the slide's own JPEG tiles into shards when the grid coincides with them.")
    read_batch_size: int = Field(default=32, ge=1, description="Tiles per batched read (cuCIM batch iterator).")
    run_name: str = Field(default="tiles", pattern=r"^[A-Za-z0-9_.]+$",
                          description="Shard name prefix: shards/{run_name}-{NNNNNN}.tar.")
    shard_max_bytes: int = Field(
        default=1_000_000_000, ge=1, description="Soft cap: a shard is closed at the first slide boundary past it.")
    workers: int | None = Field(
        default=None, ge=1, description="Tiling actors; default: the cluster's CPUs / cpus_per_worker.")
    in_process: Literal["auto", "always", "never"] = Field(
        default="auto", description="Run the one tiling worker inside the command's process, with no Ray at all "
        "(saves Ray's 3-10 s start-up). auto: when no Ray address is given (ray_address, RAY_ADDRESS), no Ray "
        "session is up, no GPU or custom resource is asked per worker, and one worker would run (workers: 1, or "
        "one slide to tile); always: whenever workers is 1 or unset; never: always through Ray actors.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Logical CPUs reserved per tiling actor.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per actor (for device=cuda decode).")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {tiling: 1} to keep the actors on "
        "the CPU node types that declare `tiling` (cluster/*.yaml): else the autoscaler may start a GPU node for them.")
    max_inflight_per_worker: int = Field(
        default=2, ge=1, description="Slides queued per actor: bounds driver and object-store memory.")
    max_worker_deaths_per_slide: int = Field(
        default=2, ge=1, description="A slide that kills its worker this many times is marked failed.")
    retry_failed: bool = Field(default=False, description="Retry slides that failed in an earlier run.")
    thumbnails: bool = Field(default=True, description="Write a QC thumbnail PNG per slide.")
    staging_dir: str | None = Field(
        default=None, description="Local scratch for remote slides and shards (default: the system temp dir).")

    @field_validator("readers")
    @classmethod
    def _distinct_readers(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"readers must not repeat a reader, got {v}")
        return v

    @field_validator("actor_resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        """CPU and GPU have their own keys (cpus_per_worker, gpus_per_worker); amounts are positive."""
        for key, amount in v.items():
            if key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"actor_resources must hold custom resources only, got {key!r} "
                                 "(use cpus_per_worker / gpus_per_worker)")
            if amount <= 0:
                raise ValueError(f"actor_resources[{key!r}] must be > 0, got {amount}")
        return v

    @field_validator("grid")
    @classmethod
    def _sane_grid(cls, g: GridConfig) -> GridConfig:
        """Bounds that a tile grid must meet to tile anything (see MAX_TILE_PX, MAX_OVERLAP)."""
        if g.tile_px > MAX_TILE_PX:
            raise ValueError(f"grid.tile_px {g.tile_px} is larger than {MAX_TILE_PX} px")
        stride = g.effective_stride_px
        if stride > MAX_TILE_PX:
            raise ValueError(f"grid.stride_px {stride} is larger than {MAX_TILE_PX} px")
        if stride * MAX_OVERLAP < g.tile_px:
            raise ValueError(f"grid.stride_px {stride} is below tile_px / {MAX_OVERLAP} "
                             f"({g.tile_px / MAX_OVERLAP:g}): more than {MAX_OVERLAP}x overlap per axis")
        return g

    @model_validator(mode="after")
    def _one_worker_in_process(self) -> "TilingSettings":
        """A process runs one worker: more in-process workers would be a silent downgrade to one."""
        if self.in_process == "always" and (self.workers or 1) > 1:
            raise ValueError(f"in_process 'always' runs one worker, got workers={self.workers}: set workers 1 "
                             "or in_process auto/never")
        return self

    def layout_key(self) -> dict:
        """The settings that decide which tiles exist and their bytes: a rerun must agree on these to resume."""
        keep = ("grid", "tissue", "encoding", "jpeg_quality", "zero_decode", "fallback_mpp", "run_name")
        return self.model_dump(mode="json", include=set(keep))


class TilingConfig(TilingSettings, DriverSettings):
    """Every setting of `gpfm-scale tile`: the tiling settings and its driver's (Ray address, metrics endpoint)."""
