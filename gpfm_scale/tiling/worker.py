"""The tiling actor: holds a reader-free shard writer across slides; one slide per call."""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

from gpfm_scale import atomic
from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.shards import SealedShard, ShardWriter
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.manifest import SlideOutcome
from gpfm_scale.tiling.slide_job import SlideTask, tile_slide


def _ray_session() -> Any:
    """The `ray` module when this process is in a Ray session, else None; never imports Ray (~1 s), so an
    in-process run (`local.py`) stays free of it."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _worker_device(cfg: TilingConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    ray = _ray_session()
    return "cuda" if ray is not None and ray.get_gpu_ids() else "cpu"


FIRST = "first"
"""The incarnation of an actor's first process: known to the driver before it answers anything."""


def _incarnation() -> str:
    """`FIRST` for an actor's first process (and outside an actor), a fresh random token for each restart."""
    ray = _ray_session()
    if ray is not None:
        ctx = ray.get_runtime_context()
        if ctx.get_actor_id() is not None and ctx.was_current_actor_reconstructed:
            return uuid.uuid4().hex
    return FIRST


class TileWorker:
    """Plain class; the stage wraps it with `ray.remote`, or runs one in its own process (`local.py`). State: the open shard of this process, and the shard
    names it already published (a queued task may still carry one: the shard then stays open past the soft cap
    until a task brings a fresh name)."""

    def __init__(self, cfg: dict[str, Any], out_url: str, umask: int | None = None) -> None:
        if umask is not None:  # this process is the actor's alone: its files get the driver user's permissions
            os.umask(umask)
        self.cfg = TilingConfig.model_validate(cfg)
        self.out = OutputDir(out_url, self.cfg.staging_dir)
        self.writer = ShardWriter(self.out.local_tmp_dir(), self.cfg.shard_max_bytes)
        self.device = _worker_device(self.cfg)
        self.published: set[str] = set()
        self.token = _incarnation()
        """This process's incarnation: new when Ray restarts the actor, so the driver counts one death once."""

    def pid(self) -> int:
        return os.getpid()

    def incarnation(self) -> str:
        """Asked by the driver after a task failed: answers only once Ray has restarted the actor."""
        return self.token

    def _ship(self, sealed: SealedShard | None, name: str) -> SealedShard | None:
        """Publish a sealed shard under the final name the driver reserved: a rename when local, one upload (no
        server-side copy) otherwise. It is not committed until the driver journals it (`driver.py`)."""
        if sealed is None:
            return None
        dest = self.out.path("shards", name)
        if self.out.is_local:
            atomic.replace_into_place(sealed.tmp_path, dest)
        else:  # an object PUT is all-or-nothing: readers never see half a shard
            self.out.fs.put_file(sealed.tmp_path, dest)
            os.remove(sealed.tmp_path)
        self.published.add(name)
        sealed.tmp_path, sealed.name = dest, name
        return sealed

    def may_seal(self, shard_name: str) -> bool:
        """Never publish over an existing shard: the name may be stale (a task Ray queued for a restarted actor
        still carries the name its dead process published or the driver committed). Checked only when the open
        shard is past the cap (one stat, or one HEAD on object stores, per seal)."""
        if shard_name in self.published:
            return False
        return self.writer.size < self.cfg.shard_max_bytes or not self.out.exists("shards", shard_name)

    def process(self, task: SlideTask, shard_name: str) -> tuple[SlideOutcome, SealedShard | None, str]:
        """The slide's outcome, the shard sealed at its end if any, and the incarnation that holds the rest."""
        outcome = tile_slide(task, self.cfg, self.writer, self.out, self.device)
        if not outcome.ok:
            return outcome, None, self.token
        sealed = self.writer.commit_slide(task.slide_id, outcome.n_tiles, self.may_seal(shard_name))
        return outcome, self._ship(sealed, shard_name), self.token

    def flush(self, shard_name: str) -> tuple[SealedShard | None, str]:
        """Seal the open shard, if any; with this process's incarnation, as `process`."""
        if self.writer.size and self.out.exists("shards", shard_name):
            raise FileExistsError(f"shard name {shard_name} is taken: refusing to overwrite it")
        return self._ship(self.writer.seal(), shard_name), self.token
