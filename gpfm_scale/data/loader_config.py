"""Config of the pretraining data loader over the tiler's WebDataset shards (CPU/torch path and DALI path).

Batch sizes are per training rank; an "epoch" here is the recipe's unit of schedule (1,250 iterations), not a
pass over the data: every (rank, loader worker) resamples shards with replacement, so there is no natural epoch.

Two models, each value owned once: `LoaderSettings` is the `loader:` section a user writes; `LoaderConfig` is what
the loaders read, those settings plus the two values the run owns and hands down (`bind`): its seed and the
length of an epoch (in pretraining `run.seed` and `schedule.iters_per_epoch`, so the data epochs and the
schedule's epochs are the same iterations and one seed covers model, data order and augmentation).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gpfm_scale.config import StrictModel


class LoaderSettings(StrictModel):
    """Where the shards are and how each training rank turns them into multi-crop batches."""

    shards: str | list[str] = Field(
        default_factory=list,
        description="Shard URLs: a glob ('out/shards/*.tar', 's3://b/shards/*.tar'), brace notation "
        "('run-{000000..000099}.tar') or a list of either; local paths or fsspec URLs (torch backend).",
    )
    backend: Literal["auto", "torch", "dali"] = Field(
        default="auto",
        description="torch: DataLoader workers, exact resume, corrupt samples skipped. dali: DALI pipeline (GPU "
        "decode when CUDA is present, else CPU); no exact resume, needs validated shards (a corrupt JPEG stops "
        "it). auto: dali when CUDA is available and DALI imports, else torch; if DALI fails mid-run it "
        "continues with the torch loader from the failed step.",
    )
    batch_size: int = Field(default=96, ge=1, description="Tiles per batch per training rank (GPFM: 96 per GPU).")
    num_workers: int = Field(
        default=8, ge=0,
        description="torch backend: DataLoader worker processes (0 = in the training process). The batch at a "
        "given step depends on this value: keep it when resuming.",
    )
    shuffle_buffer: int = Field(
        default=1000, ge=0,
        description="Samples (compressed bytes) each worker holds for shuffling; 0 or 1 = shard order.",
    )
    open_shards: int = Field(
        default=4, ge=1,
        description="torch backend: shards each worker reads at once, drawing each sample from a random one of "
        "them. Tiler shards hold whole slides, so 1 fills a batch from one or two slides and more mixes a few "
        "more; shards from `gpfm-scale mix` hold the cohort in random order, so any width mixes it.",
    )
    random_start: bool = Field(
        default=True,
        description="torch backend: read each drawn shard from a random place, wrapping around. A worker reads "
        "only part of a shard per data epoch; False (always from the first sample) then never reaches the "
        "tails of large shards. False suits tests and shards smaller than a worker's epoch.",
    )
    decode_threads: int = Field(default=4, ge=1, description="dali backend: CPU threads of the DALI pipeline.")
    prefetch: int = Field(
        default=2, ge=1,
        description="Batches prepared ahead: per DataLoader worker (torch) or DALI's prefetch queue depth.",
    )
    max_consecutive_corrupt: int = Field(
        default=1000, ge=1,
        description="torch backend: stop with ShardError after this many corrupt samples or unreadable shards "
        "in a row (the shards are not what the loader expects), instead of spinning forever.",
    )

    @field_validator("shards")
    @classmethod
    def _non_empty_entries(cls, value: str | list[str]) -> str | list[str]:
        entries = [value] if isinstance(value, str) else value
        if any(not e.strip() for e in entries):
            raise ValueError("shard URLs must be non-empty strings")
        return value

    def bind(self, seed: int, epoch_length: int) -> LoaderConfig:
        """These settings with the values the run owns handed down: the config the loaders read."""
        return LoaderConfig(**{**dict(self), "seed": seed, "epoch_length": epoch_length})


class LoaderConfig(LoaderSettings):
    """`LoaderSettings` + the run's seed and epoch length (never written by hand in a run's config: see `bind`)."""

    epoch_length: int = Field(
        ge=1, description="Iterations per data epoch: shard draws and shuffling are re-seeded at each epoch start, "
        "which bounds the work to resume mid-epoch (torch backend).")
    seed: int = Field(ge=0, description="Seeds shard draws, shuffling, augmentation and masks.")
