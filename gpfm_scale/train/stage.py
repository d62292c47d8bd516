"""`run(cfg, out, shards, resume) -> PretrainResult`: the pretraining job, from the driver.

It places the expert actors (one placement group per node, on the nodes that will run training workers), hands
`train_loop_per_worker` to a Ray Train `TorchTrainer`, and waits. Checkpoints go to `DIR/checkpoints/{run name}`;
rerunning with `--resume` continues from the newest one (Ray Train reads it back with `get_checkpoint()`), and a
lost worker restarts the group from it (`FailureConfig`). The exported teacher lands in `DIR/export/`.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from gpfm_scale.config import dump_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.ray_utils import ensure_ray
from gpfm_scale.resources import wait_for_resources
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.warm_start import resolve_format
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
    if "," in spec or "://" in spec:
        return [s for s in spec.split(",") if s]
    if os.path.isdir(os.path.join(spec, "shards")):
        spec = os.path.join(spec, "shards")
    found = sorted(glob.glob(os.path.join(spec, "*.tar") if os.path.isdir(spec) else spec))
    if not found:
        raise ConfigError(f"no shards found at {spec}")
    return [os.path.abspath(s) for s in found]


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


def _place_experts(cfg: PretrainConfig) -> Any:
    """The driver owns the expert actors for the whole run (Ray collects unowned actors, named or not)."""
    experts = cfg.objective.model.experts
    if not experts or cfg.expert_placement.mode != "remote":
        return None
    from gpfm_scale.train.expert_placement import place_expert_actors

    placed = place_expert_actors(experts, cfg.expert_placement)
    log.info("expert actors: %s", {node[:8]: n for node, n in placed.names_by_node.items()})
    return placed


def _check_run_dir(storage: str, name: str, resume: bool) -> None:
    exists = os.path.isdir(os.path.join(storage, name))
    if exists and not resume:
        raise ConfigError(f"{os.path.join(storage, name)} exists: pass --resume to continue it, or use a new --out")
    if resume and not exists:
        log.warning("--resume given but %s has no run yet: starting from step 0", os.path.join(storage, name))


def _trainer(cfg: PretrainConfig, out: str, experts: dict[str, list[str]] | None, use_gpu: bool) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "out": out, "expert_actors": experts},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run.name, storage_path=os.path.join(out, "checkpoints"),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def run(cfg: PretrainConfig, out: str, shards: str | None = None, resume: bool = False) -> PretrainResult:
    start = time.perf_counter()
    out = os.path.abspath(out)
    if shards:
        cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"shards": resolve_shards(shards)})})
    if not cfg.loader.shards:
        raise ConfigError("no shards: give --shards or loader.shards in the config")
    if cfg.init.weights is not None and not resume:  # fail here, not in every worker after Ray starts
        resolve_format(cfg.init)
    os.makedirs(out, exist_ok=True)
    _check_run_dir(os.path.join(out, "checkpoints"), cfg.run.name, resume)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(dump_config(cfg))
    ensure_ray(cfg.run.ray_address)
    use_gpu = await_workers(cfg)
    placed = _place_experts(cfg)
    names = {k: list(v) for k, v in placed.names_by_node.items()} if placed else None
    try:
        result = _trainer(cfg, out, names, use_gpu).fit()
    finally:
        if placed:
            from gpfm_scale.train.expert_placement import release_expert_actors

            release_expert_actors(placed)
    if result.error is not None:
        raise result.error
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return PretrainResult(out=out, export_dir=os.path.join(out, "export"), checkpoint=checkpoint,
                          steps=int(result.metrics.get("step", 0)) if result.metrics else 0,
                          seconds=time.perf_counter() - start, metrics=dict(result.metrics or {}))
