"""The CPU (torch) pretraining loader: resampled WebDataset shards -> multi-crop batches, exactly resumable.

Per training rank, `build_torch_loader` (chosen by `loader.build_loader`) returns an infinite iterator of
`collate_multicrop` dicts plus
  step: int, the global step this batch is for;
  stats: {"corrupt", "shard_errors", "samples"}: per-batch deltas (corrupt samples skipped and damaged shards met
    while filling this batch, samples in it), so a trainer sums them into counters whatever worker made the batch.

How the stream is built (why: the batch at step k on rank r is a pure function of (seed, rank, num_workers, k), so
a resumed run sees exactly the batches of an uninterrupted one):
  - W = max(1, num_workers) logical streams per rank. Stream v makes the batches of steps v, v + W, v + 2W, ...;
    DataLoader fetches in order and round-robin, so worker w of a loader started at step s plays stream
    (s + w) % W and starts at step s + w.
  - Data epochs of `epoch_length` steps. At each epoch start a stream re-seeds from (seed, rank, v, epoch): shard
    draws with replacement (WebDataset's ResampledShards idea, so ranks and workers need no shard split and any
    shard count works), each read once around from a random start, `open_shards` of them at once with each
    sample from a random one (a tiler shard holds whole slides), then a fresh shuffle buffer. Resampled, not
    split: ranks and workers read independent streams, so an epoch is no pass over the data (a tile can come
    twice before another once); each tile is drawn at the same rate in expectation.
  - Batches mix the cohort only if the shards do: `gpfm-scale mix` (data/mixing.py) rewrites the tiler's shards
    into shards that each hold a uniform random sample of all tiles in random order; read as above, a 96-tile
    batch then holds as many slides as uniform sampling gives, at ~1 byte read per byte delivered.
  - Starting mid-epoch, a stream replays its epoch from the start up to its first step, decoding but not
    augmenting (about 1 ms per 256-px tile, ~20x cheaper than making the crops). The decode must run: whether a
    sample is corrupt is only known by decoding it, and batch composition depends on it (a corrupt sample is
    skipped and the next one fills its place, so batches keep a fixed size).
  - Crops of sample i of the batch at step k use a torch.Generator seeded from (seed, rank, k, i); its iBOT masks
    a numpy Generator seeded from (seed, rank, k).
  The rank's world size plays no part: ranks differ by their seeds.
Why our own small pipeline (`tar_samples.py` and the stages below) and not webdataset's (ResampledShards ->
tarfile_to_samples -> shuffle -> decode, issue 13.4): measured on the same shards (benchmarks/bench_shard_reader.py,
RESULTS.md "Shard reader"), webdataset's delivers decoded tiles at 0.63x this rate with its PIL decoder and 0.84x
with ours plugged in; it ends a shard cut at a member boundary silently (tests/unit/data/test_webdataset_interop.py);
it cannot start a shard at a random byte; its default decoders unpickle `.pkl`/`.pyd` members (unless
WDS_SECURE=1). Here truncation is always reported, nothing is substituted, and every random draw is ours to seed.

Errors: a corrupt sample (undecodable image, no image, missing/bad json) is skipped, counted and logged; never
replaced by another image. A damaged shard: the samples read before the damage are used, the error is counted and
logged with the shard name, the stream draws its next shard.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gpfm_scale.data.augmentations import MultiCropTransform
from gpfm_scale.data.batch_keys import STATS, STATS_CORRUPT, STATS_SAMPLES, STATS_SHARD_ERRORS, STEP
from gpfm_scale.data.collate import collate_multicrop
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader_config import LoaderConfig
from gpfm_scale.data.seeds import TAG_SHARDS, TAG_SHUFFLE, batch_mask_rng, sample_generator
from gpfm_scale.data.shard_urls import expand_shard_urls
from gpfm_scale.data.tar_samples import CorruptSampleError, RawSample, decode_sample, iter_raw_samples, shard_size
from gpfm_scale.errors import ConfigError, ShardError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def first_step_in_epoch(stream: int, epoch: int, num_streams: int, epoch_length: int) -> int:
    """The first step of `epoch` that logical stream `stream` makes (steps congruent to stream mod num_streams)."""
    start = epoch * epoch_length
    return start + (stream - start) % num_streams


@dataclass
class Counters:
    """Problems met since the last batch; `take` hands them to the batch and resets."""

    corrupt: int = 0
    shard_errors: int = 0

    def take(self) -> dict[str, int]:
        out = {STATS_CORRUPT: self.corrupt, STATS_SHARD_ERRORS: self.shard_errors}
        self.corrupt = self.shard_errors = 0
        return out


@dataclass
class _OpenShard:
    url: str
    samples: Iterator[RawSample]
    count: int = 0


def _shard_cycle(url: str, start_fraction: float | None) -> Iterator[RawSample]:
    """Every sample of one shard once: from the first whole sample after byte `start_fraction * size` to the end,
    then from the start up to where it began (None: simply from the first sample)."""
    if start_fraction is None:
        yield from iter_raw_samples(url)
        return
    first: int | None = None
    for raw in iter_raw_samples(url, start_byte=int(start_fraction * shard_size(url))):
        first = raw.offset if first is None else first
        yield raw
    yield from iter_raw_samples(url, stop_byte=first)


def _resampled_raw(urls: list[str], rng: np.random.Generator, counters: Counters, cfg: LoaderConfig
                   ) -> Iterator[RawSample]:
    """Endless raw samples from `cfg.open_shards` open shards drawn with replacement, each next sample from a
    random one of them (a shard holds whole slides, so reading one at a time would fill a batch from one or two
    slides). Each shard is read once around from a random start (a stream reads only part of a shard per epoch;
    always starting at the head would leave the tails unseen). A finished or damaged shard (which gives what it
    had before the damage) is replaced by a new draw."""
    width, limit = cfg.open_shards, cfg.max_consecutive_corrupt

    def draw() -> _OpenShard:
        url = urls[int(rng.integers(len(urls)))]
        return _OpenShard(url, _shard_cycle(url, float(rng.random()) if cfg.random_start else None))

    slots = [draw() for _ in range(width)]
    empty_in_a_row = 0
    while True:
        i = int(rng.integers(width)) if width > 1 else 0
        slot = slots[i]
        try:
            yield next(slot.samples)
        except StopIteration:
            pass
        except ShardError as err:
            counters.shard_errors += 1
            logger.warning("damaged shard (%d samples before the damage used): %s", slot.count, err)
        else:
            slot.count += 1
            empty_in_a_row = 0
            continue
        empty_in_a_row = 0 if slot.count else empty_in_a_row + 1
        if empty_in_a_row >= limit:
            raise ShardError(f"{limit} shard draws in a row gave no sample (last: {slot.url})")
        slots[i] = draw()


def _shuffled(items: Iterator[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """WebDataset-style buffer shuffle: fill `size` items, then yield a random one and put the next in its place."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def _decoded(raws: Iterator[RawSample], counters: Counters, limit: int) -> Iterator[dict[str, Any]]:
    """Decoded samples; corrupt ones are counted, logged and dropped (nothing takes their place)."""
    bad_in_a_row = 0
    for raw in raws:
        try:
            sample = decode_sample(raw)
        except CorruptSampleError as err:
            counters.corrupt += 1
            bad_in_a_row += 1
            logger.warning("corrupt sample skipped: %s", err)
            if bad_in_a_row >= limit:
                raise ShardError(f"{limit} corrupt samples in a row (last: {err})") from None
            continue
        bad_in_a_row = 0
        yield sample


def decoded_samples(urls: list[str], cfg: LoaderConfig, key: tuple[int, ...], counters: Counters
                    ) -> Iterator[dict[str, Any]]:
    """One stream's endless decoded samples for one data epoch: resampled shards, shuffle buffer, decode, all drawn
    from generators seeded by `key` (seed, rank, stream, epoch). Problems met are added to `counters`."""
    raws = _resampled_raw(urls, np.random.default_rng([*key, TAG_SHARDS]), counters, cfg)
    raws = _shuffled(raws, cfg.shuffle_buffer, np.random.default_rng([*key, TAG_SHUFFLE]))
    return _decoded(raws, counters, cfg.max_consecutive_corrupt)


class ShardStream(IterableDataset):
    """One rank's infinite stream of batches (already collated: use with DataLoader(batch_size=None))."""

    def __init__(self, urls: list[str], loader_cfg: LoaderConfig, crop_cfg: CropConfig, mask_cfg: MaskConfig,
                 grid_hw: tuple[int, int], rank: int, start_step: int = 0) -> None:
        super().__init__()
        self.urls, self.cfg, self.mask_cfg = urls, loader_cfg, mask_cfg
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.rank, self.start_step = rank, start_step
        self.num_streams = max(1, loader_cfg.num_workers)
        self.transform = MultiCropTransform(crop_cfg)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.num_streams:
            raise ConfigError(f"ShardStream built for {self.num_streams} workers runs in {info.num_workers}")
        first = self.start_step + worker
        return self.stream_batches(first % self.num_streams, first)

    def stream_batches(self, stream: int, first_step: int) -> Iterator[dict[str, Any]]:
        """Batches of steps first_step, first_step + W, ... (first_step must be congruent to stream mod W)."""
        num_streams, length, batch_size = self.num_streams, self.cfg.epoch_length, self.cfg.batch_size
        step = first_step
        while True:
            epoch = step // length
            counters = Counters()
            samples = self._epoch_samples(stream, epoch, counters)
            skip = (step - first_step_in_epoch(stream, epoch, num_streams, length)) // num_streams
            collections.deque(itertools.islice(samples, skip * batch_size), maxlen=0)
            counters.take()  # those batches' problems were reported by the run that made them
            while step < (epoch + 1) * length:
                chosen = list(itertools.islice(samples, batch_size))
                yield self._make_batch(chosen, step, counters.take())
                step += num_streams
            samples.close()

    def _epoch_samples(self, stream: int, epoch: int, counters: Counters) -> Iterator[dict[str, Any]]:
        return decoded_samples(self.urls, self.cfg, (self.cfg.seed, self.rank, stream, epoch), counters)

    def _make_batch(self, samples: list[dict[str, Any]], step: int, stats: dict[str, int]) -> dict[str, Any]:
        seed, rank = self.cfg.seed, self.rank
        crops = []
        for i, sample in enumerate(samples):
            out: dict[str, Any] = self.transform(sample.pop("image"), sample_generator(seed, rank, step, i))
            out.update(sample)
            crops.append(out)
        batch = collate_multicrop(crops, self.mask_cfg, self.grid_hw, batch_mask_rng(seed, rank, step))
        batch[STEP] = step
        batch[STATS] = {**stats, STATS_SAMPLES: len(samples)}
        return batch


def _identity(batch: Any) -> Any:
    """DataLoader collate_fn: the dataset yields finished batches."""
    return batch


def build_torch_loader(loader_cfg: LoaderConfig, crop_cfg: CropConfig, mask_cfg: MaskConfig,
                       grid_hw: tuple[int, int], rank: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
    """Infinite iterator of this rank's batches from step `start_step` on (torch DataLoader, exact resume)."""
    urls = expand_shard_urls(loader_cfg.shards)
    dataset = ShardStream(urls, loader_cfg, crop_cfg, mask_cfg, grid_hw, rank, start_step)
    workers = loader_cfg.num_workers
    logger.info("torch loader, rank %d: %d shards, %d workers, batch %d, from step %d", rank, len(urls), workers,
                loader_cfg.batch_size, start_step)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                        prefetch_factor=loader_cfg.prefetch if workers else None)
    return iter(loader)
