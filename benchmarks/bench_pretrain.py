"""Pretraining benchmark: the Ray Train + DeepSpeed job vs a plain single-process PyTorch loop, and the expert wait.

Both sides train the same objective on the same batches, and are timed at the same points:
- baseline: a plain loop in this process over the worker's own `train_step`, built by the same
  `build_pretrain_trainer` without DeepSpeed (`LocalEngine`: the same model init, torch AdamW over the same
  parameter groups, schedules, per-module clipping, per-step seeds and EMA; bf16 as autocast over fp32 weights);
  fed by the same loader (`build_loader`, rank 0: the batches the job's rank 0 gets) through the same
  `ExpertPrefetcher` with in-process experts. It computes the job's losses (checked:
  `loss diff`), so what differs is Ray Train (the worker process and its bookkeeping) and DeepSpeed (engine wrapper,
  ZeRO-2 gradient buckets and flat partitions, clipping on its gradient shares and its optimizer step).
- job: `gpfm_scale.train.stage.run` (the `gpfm-scale pretrain` entry) with 1 worker (as many training processes
  as the baseline), first with in-process experts, then with remote expert actors (`expert_placement.mode`; on CPU
  the actor reserves a stand-in resource and computes on CPU, on another core). Ray is started before any clock.

Figures, per run, over the steps after `--warmup`:
- steady images/s = B x workers / mean step seconds; step = from asking for the batch to after the EMA update
  (the job's `step_s` rows in metrics.jsonl). compute = step - data wait - expert wait.
- wall images/s = those steps over the wall-clock time between their metrics rows (a thread watches
  metrics.jsonl, so whatever the worker does between steps counts); baseline: the loop's own clock.
- e2e images/s = every step over the whole call (Ray Train and worker start-up, DeepSpeed init, final checkpoint).
- overhead ratio = job / baseline images/s (goal >= 0.9); expert-wait share = mean expert wait / mean step
  (goal: remote < 10 %). Each configuration runs `--repeats` times, alternating; the table shows each one's
  fastest run (neighbours on a shared machine only slow a run down), the JSON every run.

Presets: CPU (default): `configs/tiny.yaml` (ViT dim 64, depth 2, patch 8; tiny_a + tiny_b experts), fp32, batch
32 of 48-px synthetic tiles, loader in the training process, one torch thread per process. GPU (`--gpu`): the
recipe (`configs/vitl14_gpfm.yaml`: ViT-L/14, 65,536 prototypes, 2 x 224 + 8 x 98 crops) with UNI, Phikon and
CONCH at random init (weight files of random values written in each expert's published layout, since the real
weights are gated), bf16, on one GPU; remote mode shares that GPU between the worker and the expert actor
(fractional GPUs), so it measures transfer and scheduling, not the overlap a separate expert GPU gives.

Run: python benchmarks/bench_pretrain.py [--steps 40] [--warmup 5] [--batch 32] [--repeats 2] [--workers 1,2]
     [--experts in_process,remote] [--gpu] [--no-cpu] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch

from gpfm_scale.config import apply_overrides, build_config, read_yaml
from gpfm_scale.contracts.shards import ShardWriter
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles
from gpfm_scale.train.pretrain_config import PretrainConfig

log = logging.getLogger("bench_pretrain")

CONFIGS = Path(__file__).resolve().parents[1] / "gpfm_scale" / "configs"
STAND_IN = "bench_expert"  # Ray resource the CPU expert actor reserves (a stand-in for an expert GPU)
GOAL_RATIO, GOAL_SHARE = 0.9, 0.10
KEY = ("kind", "experts", "workers", "precision")  # one configuration
PRESETS = {"cpu": "tiny preset (tiny.yaml), fp32", "gpu": "ViT-L/14 + UNI/Phikon/CONCH (random weights), one GPU"}


def write_shards(root: Path, n_shards: int, per_shard: int, size: int) -> list[str]:
    """`root/tiles-NNNNNN.tar`, one synthetic two-class slide of `size`-px JPEG tiles per shard."""
    tiles, _ = make_two_class_tiles(n_shards * per_shard, size, seed=0)
    writer, paths = ShardWriter(root / "tmp", max_bytes=1), []
    for s in range(n_shards):
        writer.begin_slide()
        for j in range(per_shard):
            rgb = np.ascontiguousarray(tiles[s * per_shard + j].permute(1, 2, 0).numpy())
            meta = {"slide_id": f"s{s}", "x": j * size, "y": 0}
            writer.add(f"s{s}/{j * size}_0", {"jpg": simplejpeg.encode_jpeg(rgb, quality=90),
                                              "json": json.dumps(meta).encode()})
        paths.append(str(root / f"tiles-{s:06d}.tar"))
        Path(writer.commit_slide(f"s{s}", per_shard).tmp_path).rename(paths[-1])
    shutil.rmtree(root / "tmp", ignore_errors=True)
    return paths


def cpu_config(args: argparse.Namespace, shards: list[str], mode: str, workers: int) -> PretrainConfig:
    """tiny.yaml at batch `args.batch`, `warmup + steps` iterations, one metrics row per step."""
    return build_config(PretrainConfig, apply_overrides(read_yaml(CONFIGS / "tiny.yaml"), {
        "loader.shards": shards, "loader.batch_size": args.batch, "loader.backend": "torch",
        "expert_placement.mode": mode, "expert_placement.accelerator_resource": args.stand_in,
        "expert_placement.expert_gpus_per_node": 1, "expert_placement.cpus_per_actor": 1.0,
        **run_overrides(args.warmup + args.steps, workers, 1, f"{mode}-w{workers}")}), "tiny.yaml")


def gpu_config(args: argparse.Namespace, shards: list[str], experts: list[Any], mode: str,
               precision: str) -> PretrainConfig:
    """The recipe (vitl14_gpfm.yaml) on one GPU with random-weight experts, all three on one expert device."""
    return build_config(PretrainConfig, apply_overrides(read_yaml(CONFIGS / "vitl14_gpfm.yaml"), {
        "objective.model.experts": [e.model_dump(mode="json") for e in experts], "loader.shards": shards,
        "loader.batch_size": args.gpu_batch, "loader.num_workers": args.gpu_loader_workers,
        "expert_placement.mode": mode, "expert_placement.expert_gpus_per_node": 1,
        "expert_placement.assignment": None, "deepspeed.precision": precision, "run.use_gpu": "yes",
        **run_overrides(args.gpu_warmup + args.gpu_steps, 1, args.gpu_loader_workers + 2, f"{mode}-{precision}")}),
        "vitl14_gpfm.yaml")


def run_overrides(iters: int, workers: int, cpus: float, name: str) -> dict[str, Any]:
    return {"run.num_workers": workers, "run.cpus_per_worker": cpus, "run.total_iters": iters,
            "run.checkpoint_every": iters, "run.log_every": 1, "run.max_failures": 0, "run.name": name}


def baseline_run(cfg: PretrainConfig, device: torch.device) -> dict[str, Any]:
    """The plain single-process loop (see the module docstring); rows like the job's metrics.jsonl."""
    from gpfm_scale.data.shard_stream import build_loader
    from gpfm_scale.train.build import build_pretrain_trainer, student_grid
    from gpfm_scale.train.expert_actors import ExpertPrefetcher
    from gpfm_scale.train.expert_placement import build_expert_client
    from gpfm_scale.train.step import to_device, train_step

    start = time.perf_counter()
    trainer = build_pretrain_trainer(cfg, device, use_deepspeed=False)  # bf16: autocast over fp32 weights
    grid = student_grid(cfg.objective, cfg.crops)
    placement = cfg.expert_placement.model_copy(update={"mode": "in_process"})
    client = build_expert_client(cfg.objective.model.experts, placement, None, device)
    loader = build_loader(cfg.loader_config(), cfg.crops, cfg.masks, grid, 0, 1)
    stream = iter(ExpertPrefetcher(loader, client, grid, depth=placement.prefetch_depth))
    rows, ends = [], []
    for step in range(cfg.run.total_iters):
        t0 = time.perf_counter()
        item = next(stream)
        result = train_step(trainer, to_device(item.batch, device), item.targets, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - t0
        rows.append({**result.logs(), "step": step + 1, "step_s": step_s, "data_wait_s": item.stats["data_wait_s"],
                     "expert_wait_s": item.stats["wait_s"]})
        ends.append((time.perf_counter(), step + 1))
    return {"kind": "baseline", "experts": "in_process", "workers": 1, "rows": rows, "arrivals": ends,
            "seconds": time.perf_counter() - start}


class RowClock(threading.Thread):
    """Watches a growing metrics.jsonl and records (time, rows so far) whenever rows arrive (10 ms polls): the
    wall clock between a run's metrics rows, what a user sees, the worker's bookkeeping between steps included."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.arrivals, self._done = path, [], threading.Event()

    def run(self) -> None:
        seen = 0
        while not self._done.wait(0.01):
            try:
                n = self.path.read_bytes().count(b"\n")
            except FileNotFoundError:
                continue
            if n > seen:
                self.arrivals.append((time.perf_counter(), n))
                seen = n

    def stop(self) -> None:
        self._done.set()
        self.join()


def job_run(cfg: PretrainConfig, out: Path, gpu_share: float | None = None) -> dict[str, Any]:
    """The distributed job on the running Ray instance; rows from its metrics.jsonl, row arrival times."""
    from gpfm_scale.train.stage import run as run_stage

    out.mkdir(parents=True, exist_ok=True)
    clock = RowClock(out / "metrics.jsonl")
    clock.start()
    start = time.perf_counter()
    try:
        if gpu_share is None:
            run_stage(cfg, str(out))
        else:
            shared_gpu_job(cfg, out, gpu_share)
    finally:
        clock.stop()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"kind": "job", "experts": cfg.expert_placement.mode, "workers": cfg.run.num_workers, "rows": rows,
            "arrivals": clock.arrivals, "seconds": seconds}


def shared_gpu_job(cfg: PretrainConfig, out: Path, share: float, device: str = "cuda") -> None:
    """Remote experts with one GPU: the expert actor holds `share` of it and the worker the rest (fractional GPUs;
    `place_expert_actors` reserves whole ones). The worker gets its name from an expert directory, as in
    `stage.run`, here one that lists this actor instead of placing."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from gpfm_scale.train.expert_actors import ExpertServer
    from gpfm_scale.train.expert_directory import release_expert_directory, start_expert_directory
    from gpfm_scale.train.expert_placement import actor_name
    from gpfm_scale.train.fencing import RunFence
    from gpfm_scale.train.worker import train_loop_per_worker

    node, placement = ray.get_runtime_context().get_node_id(), cfg.expert_placement
    name = actor_name(node, 0, "bench-expert")
    actor = ray.remote(ExpertServer).options(name=name, num_gpus=share, num_cpus=1,
                                             max_concurrency=placement.max_concurrency).remote(
        cfg.objective.model.experts, device, placement.dtype, placement.reply_dtype)
    directory, directory_name = start_expert_directory([], placement, fixed={node: [name]})
    try:
        ray.get(actor.describe.remote(), timeout=placement.ready_timeout_s)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "out": str(out),
                               "generation": RunFence.start(str(out)).generation, "expert_directory": directory_name},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=True,
                                         resources_per_worker={"CPU": cfg.run.cpus_per_worker, "GPU": 1 - share}),
            run_config=RunConfig(name=cfg.run.name, storage_path=str(out / "checkpoints")),
            torch_config=TorchConfig(backend="nccl" if device == "cuda" else "gloo"))
        result = trainer.fit()
    finally:
        release_expert_directory(directory)
        ray.kill(actor)
    if result.error is not None:
        raise result.error


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """Steady, wall and e2e images/s, mean step / data / expert / compute seconds and the expert share."""
    warmup, images = run["warmup"], run["batch"] * run["workers"]
    rows = [r for r in run["rows"] if r["step"] > warmup]
    if not rows:
        raise ValueError(f"no step after the {warmup} warm-up steps")
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ("step_s", "data_wait_s", "expert_wait_s")}
    compute = mean["step_s"] - mean["data_wait_s"] - mean["expert_wait_s"]
    arrivals = [(t, n) for t, n in run["arrivals"] if n >= warmup]
    wall = None
    if len(arrivals) >= 2 and arrivals[-1][0] > arrivals[0][0]:
        wall = images * (arrivals[-1][1] - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0])
    return {**{k: run.get(k) for k in KEY}, "steps": len(rows), "steady": images / mean["step_s"], "wall": wall,
            "e2e": images * len(run["rows"]) / run["seconds"], "compute_ips": images / compute, **mean,
            "compute_s": compute, "expert_share": mean["expert_wait_s"] / mean["step_s"],
            "data_share": mean["data_wait_s"] / mean["step_s"]}


def loss_diff(run: dict[str, Any], baseline: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """Relative difference of the total loss to the baseline's at step 1 (identical model, batch and seeds: ~0)
    and the largest over the run (later steps drift: KoLeo amplifies round-off, see README)."""
    if baseline is None or run["kind"] == "baseline" or run["workers"] != 1:
        return None, None
    base = {r["step"]: r["total"] for r in baseline["rows"]}
    diffs = [abs(r["total"] - base[r["step"]]) / max(abs(base[r["step"]]), 1e-12)
             for r in run["rows"] if r["step"] in base]
    return (diffs[0], max(diffs)) if diffs else (None, None)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: the fastest run (steady), with ratios to the fastest baseline of the same precision."""
    best: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        base = next((r for r in runs if r["kind"] == "baseline" and r["precision"] == run["precision"]), None)
        fig = figures(run)
        fig["loss_diff_step1"], fig["loss_diff_max"] = loss_diff(run, base)
        key = tuple(fig[k] for k in KEY)
        if key not in best or fig["steady"] > best[key]["steady"]:
            best[key] = fig
    for fig in best.values():
        base = best.get(("baseline", "in_process", 1, fig["precision"]))
        for k in ("steady", "compute_ips", "wall"):
            ok = base is not None and fig[k] and base[k]
            fig[f"ratio_{k}"] = fig[k] / base[k] if ok else None
    return list(best.values())


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(summary: list[dict[str, Any]]) -> str:
    header = ("| run | experts | workers | precision | steady img/s | wall img/s | e2e img/s | step ms | data wait ms "
              "| expert wait ms | compute ms | expert share | x base steady | x base compute | x base wall "
              "| loss diff step 1 / max |")
    lines = [header, "|" + "---|" * 16]
    for f in summary:
        lines.append(
            f"| {f['kind']} | {f['experts']} | {f['workers']} | {f['precision']} | {f['steady']:.1f} | "
            f"{_num(f['wall'], '.1f')} | {f['e2e']:.1f} | {1e3 * f['step_s']:.1f} | {1e3 * f['data_wait_s']:.1f} | "
            f"{1e3 * f['expert_wait_s']:.1f} | {1e3 * f['compute_s']:.1f} | {100 * f['expert_share']:.1f}% | "
            f"{_num(f['ratio_steady'], '.3f')} | {_num(f['ratio_compute_ips'], '.3f')} | "
            f"{_num(f['ratio_wall'], '.3f')} | {_num(f['loss_diff_step1'], '.0e')} / {_num(f['loss_diff_max'], '.0e')} |")
    return "\n".join(lines)


def goals(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals, read off the 1-worker jobs."""
    out: dict[str, Any] = {}
    for f in summary:
        if f["kind"] == "job" and f["workers"] == 1:
            out[f"overhead_ratio/{f['experts']}/{f['precision']}"] = f["ratio_steady"]
            out[f"overhead_ratio_wall/{f['experts']}/{f['precision']}"] = f["ratio_wall"]
            out[f"expert_share/{f['experts']}/{f['precision']}"] = f["expert_share"]
    ratios = [v for k, v in out.items() if k.startswith("overhead_ratio/in_process") and v is not None]
    shares = [v for k, v in out.items() if k.startswith("expert_share/remote")]
    out["overhead_goal_met"] = bool(ratios) and min(ratios) >= GOAL_RATIO
    out["remote_wait_goal_met"] = bool(shares) and max(shares) < GOAL_SHARE
    return out


def start_ray(num_cpus: int, resources: dict[str, float], env: dict[str, str]) -> bool:
    """A private local Ray instance whose processes inherit `env` (True), or the running one (False: a test's,
    which must have `resources`)."""
    import ray

    if ray.is_initialized():
        missing = {k for k in resources if ray.cluster_resources().get(k, 0) < resources[k]}
        if missing:
            raise RuntimeError(f"the running Ray instance lacks the resources {sorted(missing)}")
        return False
    os.environ.update(env, RAY_USAGE_STATS_ENABLED="0")
    ray.init(address="local", num_cpus=num_cpus, resources=resources, include_dashboard=False, log_to_driver=False)
    return True


def tagged(run: dict[str, Any], **tags: Any) -> dict[str, Any]:
    run.update(tags)
    log.info("%s %s x%d %s: %.1f s", run["kind"], run["experts"], run["workers"], run["precision"], run["seconds"])
    return run


def cpu_section(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import ray

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    shards = write_shards(work / "shards", 4, 64, 48)
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
    owned = start_ray(max(args.workers) + 2, {args.stand_in: 1}, env)
    tags = {"precision": "fp32", "warmup": args.warmup, "batch": args.batch}
    runs = []
    try:
        for repeat in range(args.repeats):
            runs.append(tagged(baseline_run(cpu_config(args, shards, "in_process", 1), torch.device("cpu")), **tags))
            for workers in args.workers:
                for mode in args.experts:
                    out = work / f"job-{mode}-w{workers}-r{repeat}"
                    runs.append(tagged(job_run(cpu_config(args, shards, mode, workers), out), **tags))
    finally:
        torch.set_num_threads(threads)
        if owned:
            ray.shutdown()
    return runs


_HF_DIRECT = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
              "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
              "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_HF_LAYER = {"attn.proj": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def timm_to_hf_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT keys -> Hugging Face `ViTModel` keys (Phikon's published layout; the inverse of `hf_vit_to_timm`)."""
    out = {}
    for key, value in state.items():
        if key in _HF_DIRECT:
            out[_HF_DIRECT[key]] = value
            continue
        _, index, rest = key.split(".", 2)  # blocks.{i}.{module}.{leaf}
        module, leaf = rest.rsplit(".", 1)
        if module == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                out[f"encoder.layer.{index}.attention.attention.{part}.{leaf}"] = chunk
        else:
            out[f"encoder.layer.{index}.{_HF_LAYER[module]}.{leaf}"] = value
    return out


def random_expert_weights(root: Path) -> list[Any]:
    """The recipe's experts (UNI, Phikon, CONCH) with weight files of random values in each one's published
    layout, so `build_expert` loads them as it would the real (gated) files. Timing does not depend on values."""
    import safetensors.torch

    from gpfm_scale.models.config import default_experts
    from gpfm_scale.models.experts import EXPERTS

    root.mkdir(parents=True, exist_ok=True)
    experts = []
    for cfg in default_experts():
        state = EXPERTS.get(cfg.name)(preprocessing=cfg.preprocessing).model.state_dict()
        state = timm_to_hf_vit(state) if cfg.name == "phikon" else state
        path = root / f"{cfg.name}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        experts.append(cfg.model_copy(update={"weights": str(path)}))
    return experts


def gpu_section(args: argparse.Namespace, work: Path, save: Callable[[list], None]) -> list[dict[str, Any]]:
    """ViT-L/14 + UNI/Phikon/CONCH on one GPU: baseline, job with in-process experts, job with the expert actor on
    a share of the same GPU. A failed job is recorded and the section goes on; a bf16 job that fails is retried in
    fp32 (TF32 matmuls on both sides) so that the ratios still come back from a one-shot device session."""
    import ray

    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 here and (env below) in Ray's processes
    experts = random_expert_weights(work / "weights")
    shards = write_shards(work / "shards", 8, 64, 256)
    owned = start_ray(os.cpu_count() or 1, {}, {"DS_ACCELERATOR": "cuda", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"})
    runs: list[dict[str, Any]] = []
    precisions = list(args.gpu_precisions)
    try:
        for precision in precisions:
            tags = {"precision": precision, "warmup": args.gpu_warmup, "batch": args.gpu_batch}
            cfg = gpu_config(args, shards, experts, "in_process", precision)
            runs.append(tagged(baseline_run(cfg, torch.device("cuda")), **tags))
            torch.cuda.empty_cache()
            save(runs)
            for mode, share in (("in_process", None), ("remote", args.gpu_expert_share)):
                try:
                    run = job_run(gpu_config(args, shards, experts, mode, precision),
                                  work / f"job-{mode}-{precision}", share)
                except Exception as err:  # logged with its traceback, its last line kept in the JSON; goes on
                    log.exception("GPU job %s %s failed", mode, precision)
                    lines = [line for line in str(err).splitlines() if line.strip()] or [repr(err)]
                    runs.append({"kind": "job", "experts": mode, "precision": precision, "error": lines[-1]})
                    if precision == "bf16" and "fp32" not in precisions and args.gpu_fallback:
                        precisions.append("fp32")
                    break
                runs.append(tagged(run, **tags))
                save(runs)
                shutil.rmtree(work / f"job-{mode}-{precision}" / "checkpoints", ignore_errors=True)
    finally:
        if owned:
            ray.shutdown()
    return runs


def machine() -> dict[str, Any]:
    import ray

    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "loadavg": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="measured steps per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of the figures")
    p.add_argument("--batch", type=int, default=32, help="tiles per step per worker (CPU preset)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", default=[1], type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--experts", default=["in_process", "remote"], type=lambda s: s.split(","))
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU preset)")
    p.add_argument("--stand-in", default=STAND_IN, help="Ray resource the CPU expert actor reserves")
    p.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="the tiny CPU preset")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="the ViT-L/14 + UNI/Phikon/CONCH preset on one GPU")
    p.add_argument("--gpu-batch", type=int, default=32)
    p.add_argument("--gpu-steps", type=int, default=12)
    p.add_argument("--gpu-warmup", type=int, default=3)
    p.add_argument("--gpu-loader-workers", type=int, default=10)
    p.add_argument("--gpu-precisions", default=["bf16"], type=lambda s: s.split(","))
    p.add_argument("--gpu-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="rerun in fp32 when a bf16 job fails")
    p.add_argument("--gpu-expert-share", type=float, default=0.25, help="GPU fraction of the remote expert actor")
    p.add_argument("--work", type=Path, default=None, help="keep shards and run folders here")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="batch 8, 1 + 4 steps, 1 repeat: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.warmup, args.steps, args.repeats, args.workers = 8, 1, 4, 1, [1]
    return args


def section(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = summarise([r for r in runs if "error" not in r])
    return {"name": name, "runs": runs, "summary": summary, "goals": goals(summary),
            "errors": [r for r in runs if "error" in r]}


def print_section(result: dict[str, Any]) -> None:
    print(f"\n{result['name']}\n{table(result['summary'])}")
    for err in result["errors"]:
        print(f"FAILED: job {err['experts']} {err['precision']}: {err['error']}")
    print("goals: " + ", ".join(f"{k} {_num(v, '.3f') if isinstance(v, float) else v}"
                                for k, v in result["goals"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "machine": machine()}

    def save(key: str, runs: list[dict[str, Any]]) -> None:
        out[key] = section(f"{key.upper()}: {PRESETS[key]}", runs)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")

    try:
        if args.cpu:
            save("cpu", cpu_section(args, work / "cpu"))
            print_section(out["cpu"])
        if args.gpu:
            save("gpu", gpu_section(args, work / "gpu", lambda runs: save("gpu", runs)))
            print_section(out["gpu"])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
