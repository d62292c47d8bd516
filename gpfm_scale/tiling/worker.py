"""The tiling actor: holds a reader-free shard writer across slides; one slide per call."""

from __future__ import annotations

import os
from typing import Any

from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.manifest import SlideOutcome
from gpfm_scale.tiling.outputs import OutputDir
from gpfm_scale.tiling.shards import SealedShard, ShardWriter
from gpfm_scale.tiling.slide_job import SlideTask, tile_slide


def _worker_device(cfg: TilingConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import ray

    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"


class TileWorker:
    """Plain class; the stage wraps it with `ray.remote`. State: the open shard of this process."""

    def __init__(self, cfg: dict[str, Any], out_url: str, umask: int | None = None) -> None:
        if umask is not None:  # this process is the actor's alone: its files get the driver user's permissions
            os.umask(umask)
        self.cfg = TilingConfig.model_validate(cfg)
        self.out = OutputDir(out_url, self.cfg.staging_dir)
        self.writer = ShardWriter(self.out.local_tmp_dir(), self.cfg.shard_max_bytes)
        self.device = _worker_device(self.cfg)

    def pid(self) -> int:
        return os.getpid()

    def _ship(self, sealed: SealedShard | None) -> SealedShard | None:
        """Make a sealed shard visible to the driver: already in place when local, uploaded to shards/.tmp otherwise."""
        if sealed is None or self.out.is_local:
            return sealed
        sealed.tmp_path = self.out.publish(sealed.tmp_path, "shards", ".tmp", os.path.basename(sealed.tmp_path))
        return sealed

    def process(self, task: SlideTask) -> tuple[SlideOutcome, SealedShard | None]:
        outcome = tile_slide(task, self.cfg, self.writer, self.out, self.device)
        sealed = self.writer.commit_slide(task.slide_id, outcome.n_tiles) if outcome.ok else None
        return outcome, self._ship(sealed)

    def flush(self) -> SealedShard | None:
        return self._ship(self.writer.seal())
