"""The inference actor of the embedding pipeline, and the one place that calls the Ray Data API.

Ray Data's way to size an actor pool changed twice (`compute="actors"` + `ActorPoolStrategy(min, max)`, then
`concurrency=`, now deprecated again in favour of `compute=ActorPoolStrategy(size=...)` in Ray 2.60, the version
pinned here); `build_pipeline` is the only function that spells it, so the next change is a one-line fix.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.decode import read_task
from gpfm_scale.embed.models import ModelInfo, build_embedder
from gpfm_scale.embed.sink import PartWriter
from gpfm_scale.errors import ConfigError
from gpfm_scale.resources import wait_for_resources

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ResourcePlan:
    """How many inference actors, with what, beside how many read tasks (resolved against the cluster)."""

    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    read_tasks: int | None
    cpus_per_read_task: float

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"


def wait_for_cluster(cfg: EmbedConfig) -> dict[str, float]:
    """Ask the autoscaler for the inference actors and one read slot, wait until they fit (all `num_actors` when
    set, else one actor beside the read slot: the automatic plan then sizes itself to what is up) and return
    `ray.cluster_resources()` for `plan_resources`. A GPU asked for (`gpus_per_actor` > 0) is waited for, never
    replaced by CPU; ResourcesUnavailableError after `resources_timeout_s`."""
    import ray

    actor = {"CPU": cfg.cpus_per_actor, "GPU": cfg.gpus_per_actor or 0.0}
    bundles = [actor, {"CPU": cfg.cpus_per_read_task}] + [actor] * ((cfg.num_actors or 1) - 1)
    wait_for_resources(bundles, what="embedding", timeout_s=cfg.resources_timeout_s,
                       min_bundles=None if cfg.num_actors else 2)
    return ray.cluster_resources()


def plan_resources(cfg: EmbedConfig, cluster: dict[str, float]) -> ResourcePlan:
    """Resolve the automatic settings; ConfigError for a plan that would leave no CPU for the read tasks (on
    which Ray Data waits forever without a word) or that asks for GPUs the cluster does not have."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if cfg.gpus_per_actor is None and gpus < 1:
        log.warning("no GPU in the cluster: embedding on CPU (set gpus_per_actor: 1 to wait for GPU nodes)")
    if gpus_per_actor > gpus:
        raise ConfigError(f"gpus_per_actor={gpus_per_actor} but the cluster has {gpus:g} GPU(s)")
    spare = cpus - cfg.cpus_per_read_task
    if cfg.num_actors is not None:
        num_actors = cfg.num_actors
    elif gpus_per_actor > 0:
        num_actors = max(1, int(gpus // gpus_per_actor))
    else:
        num_actors = max(1, int(spare / 2 // cfg.cpus_per_actor))
    if num_actors * cfg.cpus_per_actor > spare + 1e-9:
        raise ConfigError(
            f"num_actors={num_actors} x cpus_per_actor={cfg.cpus_per_actor:g} leaves less than cpus_per_read_task="
            f"{cfg.cpus_per_read_task:g} of the cluster's {cpus:g} CPUs for reading: Ray Data would wait forever. "
            "Lower num_actors or give fractional cpus_per_actor / cpus_per_read_task (e.g. 0.5)")
    threads = cfg.torch_threads or max(1, int(cfg.cpus_per_actor))
    return ResourcePlan(num_actors, cfg.cpus_per_actor, gpus_per_actor, threads, cfg.read_tasks,
                        cfg.cpus_per_read_task)


def autocast_dtype(cfg: EmbedConfig, device: str) -> torch.dtype | None:
    """bfloat16 autocast on GPU by default, plain float32 on CPU (bf16 is 8-10x slower on CPUs without it)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else None
    return None if cfg.dtype == "float32" else _DTYPES[cfg.dtype]


class Predictor:
    """`map_batches` callable class: builds the model once per actor, then batch -> batch with `features`.

    Input columns: `image` uint8 [B, 3, S, S] and `ok` (bool); every other column passes through unchanged.
    Output: the same minus `image`, plus `features` [B, D] in `feature_dtype` (zeros where `ok` is False: those rows are
    markers or corrupt samples, which the driver counts and never stores as features). With `parts_out` (slides),
    the actor writes the features itself and returns only `sink.PartWriter`'s per-slide summary rows.
    """

    def __init__(self, info: ModelInfo, cfg_json: str, device: str, threads: int,
                 parts_out: str | None = None) -> None:
        cfg = EmbedConfig.model_validate_json(cfg_json)
        if device == "cpu":
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.embedder = build_embedder(info, cfg).to(self.device)
        self.dim = info.dim
        self.dtype = autocast_dtype(cfg, device)
        self.feature_dtype = np.dtype(cfg.feature_dtype)
        self.parts = PartWriter(parts_out) if parts_out is not None else None
        log.info("embedding actor ready: %s on %s (%s)", info.name, device, self.dtype or torch.float32)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = np.asarray(batch["ok"], bool)
        features = np.zeros((len(ok), self.dim), self.feature_dtype)
        if ok.any():
            tiles = torch.from_numpy(np.ascontiguousarray(images[ok])).to(self.device, non_blocking=True)
            with self._autocast():
                out = self.embedder(tiles)
            features[ok] = out.float().cpu().numpy()
        batch["features"] = features
        return self.parts.summarise(batch) if self.parts is not None else batch


def build_pipeline(tasks: list[dict[str, Any]], info: ModelInfo, cfg: EmbedConfig, plan: ResourcePlan,
                   parts_out: str | None = None) -> Any:
    """The Ray Data dataset: tasks -> read/decode/resize (CPU tasks) -> inference (actor pool) -> driver.

    One input block per task so read tasks run in parallel; `batch_size=1` hands each read task one task row.
    `parts_out`: the actors write slide features under it and send the driver summaries (`sink.py`).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the stage draws one bar, in slides and images
    ctx.wait_for_min_actors_s = cfg.wait_for_actors_s or -1  # -1: Ray Data's default, actors start asynchronously
    rows = [{"task": json.dumps(t)} for t in tasks]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    read_tasks = min(plan.read_tasks, len(rows)) if plan.read_tasks else None
    read_compute = ray.data.TaskPoolStrategy(size=read_tasks) if read_tasks else None
    # Ray Data fuses a task map into the next actor map when their resource requests are equal (CPU-only actors
    # with 1 CPU, like the read tasks), which would move decoding into the inference actors and cap it at
    # `num_actors` workers. The read tasks' memory reservation (which they need anyway: a decoded block) makes the
    # requests differ, so decoding stays a separate pool of `read_tasks` tasks whatever the actor count.
    ds = ds.map_batches(read_task, batch_size=1, compute=read_compute, num_cpus=plan.cpus_per_read_task,
                        memory=cfg.read_task_memory_bytes,
                        fn_kwargs={"size": info.contract.size, "rows": cfg.decode_batch})
    # the embedding settings alone: a command's config may extend EmbedConfig (`embed_command`: + tiling)
    cfg_json = cfg.model_dump_json(include=set(EmbedConfig.model_fields))
    return ds.map_batches(
        Predictor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
        fn_constructor_kwargs={"info": info, "cfg_json": cfg_json, "device": plan.device,
                               "threads": plan.torch_threads, "parts_out": parts_out})
