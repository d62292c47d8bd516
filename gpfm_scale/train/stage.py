"""`run(cfg, out, shards, resume) -> PretrainResult`: the pretraining job, from the driver.

It starts the expert directory (which places a node's expert actors when its first training worker asks), hands
`train_loop_per_worker` to a Ray Train `TorchTrainer`, and waits. Checkpoints go to `DIR/checkpoints/{run name}`;
rerunning with `--resume` continues from the newest one (Ray Train reads it back with `get_checkpoint()`), and a
lost worker restarts the group from it (`FailureConfig`). The exported teacher lands in `DIR/export/`.

One run at a time owns DIR: the driver takes its `OutputLock` before reading anything there and holds it to the
end, checks that DIR holds no other run and that a resume keeps the trajectory (`resume.check_out`), and then
starts a new fencing generation (`fencing.RunFence`) that its workers check before each write into DIR.

DIR may be a bucket URL (s3://, gs://): Ray Train then writes checkpoints through a pyarrow filesystem wrapping
the same fsspec filesystem (`storage.ray_storage`), and config.yaml, metrics.jsonl, the fencing token and the
export are uploaded whole (`gpfm_scale.storage`). A relative DIR inside a submitted Ray job is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpfm_scale import storage
from gpfm_scale.contracts.shards import list_shards
from gpfm_scale.errors import ConfigError
from gpfm_scale.extras import require
from gpfm_scale.ray_utils import ensure_ray, ray_level_name
from gpfm_scale.resources import wait_for_resources
from gpfm_scale.run_lock import OutputLock
from gpfm_scale.train.fencing import RunFence
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.warm_start import resolve_format
from gpfm_scale.train.resume import check_out, write_run_config
from gpfm_scale.train.worker import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    out: str
    export_dir: str
    checkpoint: str | None
    steps: int
    seconds: float
    metrics: dict[str, Any]


def resolve_shards(spec: str) -> list[str]:
    """A tiler output dir, a shards dir, a glob or a comma-separated list -> the shard URLs (local ones checked)."""
    if "," in spec:
        return [s for s in spec.split(",") if s]
    found = list_shards(spec)
    if not found:
        raise ConfigError(f"no shards found at {spec}")
    return found


def _use_gpu(cfg: PretrainConfig) -> bool:
    """`auto` decides from the GPUs up now (a recipe config says `yes`, so ViT-L never lands on CPU unnoticed)."""
    import ray

    if cfg.run.use_gpu != "auto":
        return cfg.run.use_gpu == "yes"
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return True
    log.warning("run.use_gpu auto: no GPU in the cluster, training on CPU (set run.use_gpu: yes to wait for GPUs)")
    return False


def await_workers(cfg: PretrainConfig) -> bool:
    """Ask the autoscaler for every training worker's CPUs (+ 1 GPU each when training on GPU) and wait until they
    all fit, before the experts are placed on those nodes; -> use_gpu. ResourcesUnavailableError on timeout."""
    use_gpu = _use_gpu(cfg)
    worker = {"CPU": cfg.run.cpus_per_worker, "GPU": 1.0 if use_gpu else 0.0}
    wait_for_resources([worker] * cfg.run.num_workers, what="training workers",
                       timeout_s=cfg.run.resources_timeout_s)
    return use_gpu


def _place_experts(cfg: PretrainConfig) -> tuple[Any, str | None]:
    """The expert directory, (handle, name): it places a node's expert actors when that node's first worker asks.
    The driver owns it for the whole run (Ray collects unowned actors, named or not)."""
    experts = cfg.objective.model.experts
    if not experts or cfg.expert_placement.mode != "remote":
        return None, None
    from gpfm_scale.train.expert_directory import start_expert_directory

    return start_expert_directory(experts, cfg.expert_placement)


def _trainer(cfg: PretrainConfig, fence: RunFence, experts: str | None, use_gpu: bool,
             callbacks: Sequence[Any]) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_filesystem = storage.ray_storage(storage.join(fence.out, "checkpoints"))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "out": fence.out, "generation": fence.generation,
                           "expert_directory": experts},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             callbacks=list(callbacks),
                             logging_config=LoggingConfig(log_level=ray_level_name())),  # controller + workers
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def _fit(cfg: PretrainConfig, fence: RunFence, callbacks: Sequence[Any]) -> Any:
    """Train under Ray Train with the driver-owned expert directory; returns Ray Train's Result."""
    ensure_ray(cfg.run.ray_address)
    use_gpu = await_workers(cfg)
    directory, directory_name = _place_experts(cfg)
    try:
        return _trainer(cfg, fence, directory_name, use_gpu, callbacks).fit()
    finally:
        if directory is not None:
            from gpfm_scale.train.expert_directory import release_expert_directory

            release_expert_directory(directory)


def run(cfg: PretrainConfig, out: str, shards: str | None = None, resume: bool = False,
        callbacks: Sequence[Any] = ()) -> PretrainResult:
    """Pretrain into `out` (see the module docstring). `callbacks`: `ray.train.UserCallback`s, run on Ray Train's
    controller after each checkpoint it has registered (`after_report`, the point a restart resumes from) and after
    a worker failed (`after_exception`): for embedders (notifications), and for tests, which act at those exact
    points instead of polling Ray's internal files."""
    require("deepspeed", "train", "pretraining")  # here, not as a traceback from every Ray Train worker
    start = time.perf_counter()
    out = storage.resolve_out(out)
    if shards:
        cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"shards": resolve_shards(shards)})})
    if not cfg.loader.shards:
        raise ConfigError("no shards: give --shards or loader.shards in the config")
    if cfg.init.weights is not None and not resume:  # fail here, not in every worker after Ray starts
        resolve_format(cfg.init)
    with OutputLock(out, "pretrain"):
        check_out(out, cfg, resume)
        write_run_config(out, cfg)
        fence = RunFence.start(out)
        result = _fit(cfg, fence, callbacks)
    if result.error is not None:
        raise result.error
    checkpoint = storage.from_ray_path(out, result.checkpoint.path) if result.checkpoint else None
    return PretrainResult(out=out, export_dir=storage.join(out, "export"), checkpoint=checkpoint,
                          steps=int(result.metrics.get("step", 0)) if result.metrics else 0,
                          seconds=time.perf_counter() - start, metrics=dict(result.metrics or {}))
