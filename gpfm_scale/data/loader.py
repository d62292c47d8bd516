"""The pretraining loader of one rank: picks the backend (`loader.backend`) above both, so neither imports the other.

Backends, each yielding the same batch dict (`collate_multicrop` fields plus `step` and `stats`):
  - torch (`shard_stream.build_torch_loader`): DataLoader workers, exact resume, corrupt samples skipped;
  - DALI (`dali_pipeline.build_dali_loader`): decode and crops in a DALI pipeline, no exact resume, needs
    validated shards. With `backend: auto` a DALI failure mid-run continues on the torch backend from the
    failed step (`with_fallback`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gpfm_scale.data.batch_keys import STEP
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader_config import LoaderConfig
from gpfm_scale.data.shard_stream import build_torch_loader
from gpfm_scale.errors import ConfigError, ShardError

logger = logging.getLogger(__name__)


def resolve_backend(cfg: LoaderConfig) -> str:
    """"torch" or "dali": `auto` means DALI when CUDA is available and DALI imports."""
    if cfg.backend != "auto":
        return cfg.backend
    from gpfm_scale.data.dali_pipeline import dali_available  # here: a torch-only run never imports DALI

    return "dali" if torch.cuda.is_available() and dali_available() else "torch"


def with_fallback(primary: Iterator[dict[str, Any]], fallback: Callable[[int], Iterator[dict[str, Any]]],
                  start_step: int) -> Iterator[dict[str, Any]]:
    """Yield from `primary` until it fails (RuntimeError from DALI, ShardError), then from `fallback(next_step)`."""
    step = start_step
    try:
        for batch in primary:
            yield batch
            step = int(batch[STEP]) + 1
    except (RuntimeError, ShardError) as err:
        logger.error("DALI loader failed before step %d; continuing with the torch loader: %s", step, err)
        yield from fallback(step)


def build_loader(loader_cfg: LoaderConfig, crop_cfg: CropConfig, mask_cfg: MaskConfig, grid_hw: tuple[int, int],
                 rank: int, world_size: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
    """This rank's infinite batch iterator, from the backend `loader_cfg.backend` resolves to (see LoaderConfig).

    grid_hw: the student's patch grid (global size / patch size) for the iBOT masks.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} outside world of size {world_size}")
    if start_step < 0:
        raise ConfigError(f"start_step must be >= 0, got {start_step}")
    backend = resolve_backend(loader_cfg)
    if backend == "torch":
        return build_torch_loader(loader_cfg, crop_cfg, mask_cfg, grid_hw, rank, start_step)
    from gpfm_scale.data.dali_pipeline import build_dali_loader

    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    dali = build_dali_loader(loader_cfg, crop_cfg, mask_cfg, grid_hw, rank, world_size, device_id, start_step)
    if loader_cfg.backend == "dali":
        return dali
    return with_fallback(dali, lambda step: build_torch_loader(loader_cfg, crop_cfg, mask_cfg, grid_hw, rank, step),
                         start_step)
