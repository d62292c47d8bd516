"""The Ray Train worker: one function, `train_loop_per_worker(config)`, handed to `TorchTrainer`.

A thin loop over `train_step` (step.py, the step every trainer shares), built by `build_pretrain_trainer` with
DeepSpeed: take the next batch (its expert targets were requested one step earlier, so the experts compute while
the previous step runs), run the step, report. Everything a resumed run needs is in the checkpoint or is a pure
function of the step (schedules, data order, the step's seed).

Writes into --out (metrics rows, checkpoints, the export) each check the run's fencing generation first
(`fencing.RunFence`): a worker whose driver died and whose --out a newer run took over stops without writing.
Rank 0 cuts metrics.jsonl back to the step it resumed from, so that each step keeps one row.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from gpfm_scale import storage
from gpfm_scale.data.batch_keys import STATS, STATS_CORRUPT, STATS_SHARD_ERRORS
from gpfm_scale.extras import require
from gpfm_scale.metrics import PRETRAIN, AgentRecorder
from gpfm_scale.train.fencing import RunFence
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.progress import show_metrics, step_bar
from gpfm_scale.train.resume import METRICS_NAME, truncate_metrics

if TYPE_CHECKING:  # step.py imports the model code (timm): the driver, which imports this module, never needs it
    from gpfm_scale.train.step import StepResult

log = logging.getLogger(__name__)


@dataclass
class StepTimes:
    data_wait_s: float
    expert_wait_s: float
    step_s: float


@dataclass
class DataProblems:
    """What this rank's loader skipped, from its batches' `stats`: corrupt samples and damaged shards (a shard cut
    short or with a bad header: its samples before the damage were used). Totals since the run (re)started, and
    the increments not yet added to the Prometheus counters."""

    corrupt_samples: int = 0
    damaged_shards: int = 0
    _published: tuple[int, int] = (0, 0)

    def add(self, stats: dict[str, int]) -> None:
        self.corrupt_samples += int(stats.get(STATS_CORRUPT, 0))
        self.damaged_shards += int(stats.get(STATS_SHARD_ERRORS, 0))

    def take_new(self) -> tuple[int, int]:
        """(corrupt samples, damaged shards) since the last call."""
        now = (self.corrupt_samples, self.damaged_shards)
        new = (now[0] - self._published[0], now[1] - self._published[1])
        self._published = now
        return new


def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _expert_stream(cfg: PretrainConfig, loader: Iterator[dict], grid: tuple[int, int], device: torch.device,
                   directory: str | None) -> Iterator[tuple[dict, dict | None, float, float]]:
    """Yields (batch, expert targets or None, data wait s, expert wait s); targets come one step ahead."""
    from gpfm_scale.train.expert_actors import ExpertPrefetcher
    from gpfm_scale.train.expert_placement import build_expert_client

    experts = cfg.objective.model.experts
    if not experts:
        while True:
            t0 = time.perf_counter()
            batch = next(loader)
            yield batch, None, time.perf_counter() - t0, 0.0
    placement = cfg.expert_placement
    client = build_expert_client(experts, placement, directory, device)
    for item in ExpertPrefetcher(loader, client, grid, depth=placement.prefetch_depth):
        yield item.batch, item.targets, item.stats.get("data_wait_s", 0.0), item.stats["wait_s"]


def _last_step(cfg: PretrainConfig) -> int:
    return min(cfg.run.total_iters, cfg.run.stop_after_steps or cfg.run.total_iters)


def _report_every(cfg: PretrainConfig, step: int) -> tuple[bool, bool]:
    last = step + 1 == _last_step(cfg)
    ckpt = (step + 1) % cfg.run.checkpoint_every == 0 or last
    return ckpt or (step + 1) % cfg.run.log_every == 0, ckpt


def _metrics(result: StepResult, times: StepTimes, images: int, world: int, problems: DataProblems
             ) -> dict[str, float]:
    out = result.logs()
    per_worker = images / times.step_s if times.step_s > 0 else 0.0
    out.update(step=result.step + 1, step_s=times.step_s, data_wait_s=times.data_wait_s,
               expert_wait_s=times.expert_wait_s, images_per_s_worker=per_worker, images_per_s=per_worker * world,
               corrupt_samples=problems.corrupt_samples, damaged_shards=problems.damaged_shards)
    return out


def _append_metrics(fence: RunFence, row: dict[str, float]) -> None:
    """One metrics.jsonl row (rank 0), unless a newer run owns --out (SupersededRunError, nothing written)."""
    fence.check(f"the metrics row of step {row['step']}")
    storage.append_bytes(storage.join(fence.out, METRICS_NAME), (json.dumps(row) + "\n").encode())


def _publish(recorder: AgentRecorder, metrics: dict[str, float], rank: int, problems: DataProblems,
             fence: RunFence | None) -> None:
    """Every rank records its own step timing through Ray's metrics agent; rank 0 also the run's figures and the
    metrics.jsonl row."""
    r = str(rank)
    recorder.set(PRETRAIN.step_seconds, metrics["step_s"], rank=r)
    recorder.set(PRETRAIN.data_wait_seconds, metrics["data_wait_s"], rank=r)
    recorder.set(PRETRAIN.expert_wait_seconds, metrics["expert_wait_s"], rank=r)
    recorder.set(PRETRAIN.worker_images_per_second, metrics["images_per_s_worker"], rank=r)
    new_corrupt, new_damaged = problems.take_new()
    recorder.inc(PRETRAIN.corrupt_samples, new_corrupt, rank=r)
    recorder.inc(PRETRAIN.damaged_shards, new_damaged, rank=r)
    if rank != 0:
        return
    recorder.set(PRETRAIN.step, metrics["step"])
    recorder.set(PRETRAIN.images_per_second, metrics["images_per_s"])
    recorder.set(PRETRAIN.lr, metrics["lr"])
    recorder.set(PRETRAIN.momentum, metrics["momentum"])
    recorder.set(PRETRAIN.teacher_temperature, metrics["teacher_temp"])
    for key, value in metrics.items():
        if key == "total" or key.startswith(("dino", "ibot", "koleo", "expert/")):
            recorder.set(PRETRAIN.loss, value, term=key)
    if fence:
        _append_metrics(fence, metrics)


def _save_and_report(engine: Any, metrics: dict[str, float], step: int, fence: RunFence | None) -> None:
    """Checkpoint after `step` (every rank: DeepSpeed's save is collective), unless a newer run owns --out."""
    import ray.train

    from gpfm_scale.train.checkpoint import save_training_state

    if fence:
        fence.check(f"the checkpoint of step {step + 1}")
    with tempfile.TemporaryDirectory(prefix="gpfm-ckpt-") as tmp:
        save_training_state(engine, tmp, step + 1)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _resume(engine: Any) -> int:
    import ray.train

    from gpfm_scale.train.checkpoint import load_training_state

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        step = load_training_state(engine, directory)
    log.info("resumed at step %d", step)
    return step


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"cfg": PretrainConfig as dict, "out": str, "generation": the run's fencing
    token (see fencing.py), "expert_directory": the expert directory actor's name or None}."""
    deepspeed = require("deepspeed", "train", "pretraining")
    import ray.train

    from gpfm_scale.data.loader import build_loader
    from gpfm_scale.train.build import build_pretrain_trainer, student_grid
    from gpfm_scale.train.step import to_device, train_step

    cfg = PretrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    trainer = build_pretrain_trainer(cfg, device, rank=rank, world=world,
                                     resuming=ray.train.get_checkpoint() is not None)
    start = _resume(trainer.engine)
    fence = RunFence(config["out"], config["generation"]) if config.get("out") else None
    if fence and rank == 0:  # rows past the checkpoint are computed again from here: one row per step
        fence.check("metrics.jsonl")
        truncate_metrics(storage.join(fence.out, METRICS_NAME), start)
    recorder, problems = AgentRecorder(), DataProblems()
    grid = student_grid(cfg.objective, cfg.crops)
    loader = build_loader(cfg.loader_config(), cfg.crops, cfg.masks, grid, rank, world, start_step=start)
    stream = _expert_stream(cfg, loader, grid, device, config.get("expert_directory"))
    bar = step_bar(_last_step(cfg), start, enabled=rank == 0)
    for step in range(start, _last_step(cfg)):
        t0 = time.perf_counter()
        batch, targets, data_wait, expert_wait = next(stream)
        problems.add(batch.get(STATS, {}))
        result = train_step(trainer, to_device(batch, device), targets, step)
        report, ckpt = _report_every(cfg, step)
        bar.update(1)
        if not report:
            continue
        if device.type == "cuda":  # kernels are queued asynchronously: the step ends when they have run
            torch.cuda.synchronize(device)
        times = StepTimes(data_wait, expert_wait, time.perf_counter() - t0)
        metrics = _metrics(result, times, cfg.loader.batch_size, world, problems)
        metrics["resumed_from"] = start
        _publish(recorder, metrics, rank, problems, fence)
        show_metrics(bar, metrics["total"], metrics["images_per_s"])
        if ckpt:  # metrics alone go to metrics.jsonl and Prometheus: a bare ray.train.report cost 1-2 s here
            _save_and_report(trainer.engine, metrics, step, fence)
    bar.close()
    if fence and _last_step(cfg) == cfg.run.total_iters:
        from gpfm_scale.train.checkpoint import export_teacher

        fence.check("the exported teacher")
        export_teacher(trainer.model, cfg.objective.model.backbone, storage.join(fence.out, "export"),
                       cfg.run.total_iters, is_writer=rank == 0, crops=cfg.crops)
