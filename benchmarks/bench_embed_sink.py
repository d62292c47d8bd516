"""Who writes the slide features: the inference actors (the stage, `embed/sink.py`) vs the driver (main before
issue 12.4), in one process, on the same shards, model, batch and Ray cluster.

- workers: `gpfm_scale.embed.stage.run` (read tasks -> actor embeds and writes per-batch parts, returns per-slide
  summaries -> a Ray task publishes each slide's .h5). `EmbedResult.driver_bytes` counts what the driver received.
- driver: the same `predictor.build_pipeline` without `parts_out`: every feature row returns to the driver, which
  groups rows per slide, sorts them into shard order and writes `features/{slide}.h5` with the same
  `store.write_slide_features`. A lean re-creation of main's driver path (no corrupt/non-finite/unsafe-id checks),
  so if anything it flatters the baseline.
Driver bytes = the summed `nbytes` of every column of every block `iter_batches` hands the driver (numpy arrays:
what the driver process materialises), per embedded tile.

Model: a one-block timm ViT (`vit_small_patch16_224` shape-overridden: 32-px input, patch 16, D = `--dim`, random
weights): cheap on a CPU yet with a foundation model's feature width (ViT-L: 1,024; GPFM's distilled: 1,536).
Timing: `e2e` = tiles / wall time of the whole run, start-up included (actor start and model build on both sides,
10-20 s on a loaded 2-core VM); `busy` = tiles / (wall time - time to the first output block), the rate once
start-up is paid, publishing and index writes included. The sides alternate `--repeats` times and each reports its
fastest run (neighbours on a shared machine only slow runs down).

Run: python benchmarks/bench_embed_sink.py [--slides 16] [--tiles-per-slide 128] [--dim 1024] [--dtype float32]
     [--repeats 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gpfm_scale.config import build_config
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.models import describe_model
from gpfm_scale.embed.predictor import build_pipeline, plan_resources
from gpfm_scale.embed.stage import run as run_stage
from gpfm_scale.contracts.features import write_slide_features

log = logging.getLogger("bench_embed_sink")
MODEL = "timm:vit_small_patch16_224"


def config(dim: int, dtype: str) -> EmbedConfig:
    return build_config(EmbedConfig, {
        "batch_size": 64, "num_actors": 1, "read_tasks": 1, "cpus_per_actor": 1.0, "gpus_per_actor": 0.0,
        "torch_threads": 1, "decode_batch": 256, "wait_for_actors_s": 600, "feature_dtype": dtype,
        "allow_random_init": True,
        "timm_kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": dim, "depth": 1, "num_heads": 4,
                        "mlp_ratio": 0.25}})


def run_workers(cfg: EmbedConfig, root: Path, out: Path) -> dict[str, Any]:
    result = run_stage(cfg, MODEL, str(root), str(out))
    if not result.ok:
        raise RuntimeError(f"stage failed: {result.failed[:3]}")
    return {"images": result.n_embedded, "seconds": result.seconds, "startup": result.startup_seconds,
            "driver_bytes": result.driver_bytes}


def run_driver(cfg: EmbedConfig, root: Path, out: Path) -> dict[str, Any]:
    import ray

    start = time.perf_counter()
    info = describe_model(MODEL, cfg)
    manifest = pd.read_parquet(root / "manifest.parquet")
    tasks = [{"shard": str(root / "shards" / name), "include": [sid]}
             for sid, names in zip(manifest["slide_id"], manifest["shards"]) for name in names]
    parts: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    received, n, first = 0, 0, None
    blocks = build_pipeline(tasks, info, cfg, plan_resources(cfg, ray.cluster_resources()))
    for block in blocks.iter_batches(batch_size=None, batch_format="numpy"):
        received += sum(np.asarray(v).nbytes for v in block.values())
        tile = (block["total"] < 0) & block["ok"]
        for sid in map(str, np.unique(block["slide_id"][tile])):
            rows = tile & (block["slide_id"] == sid)
            parts[sid]["index"].append(block["index"][rows])
            parts[sid]["coords"].append(np.stack([block["x"][rows], block["y"][rows]], axis=1))
            parts[sid]["features"].append(block["features"][rows])
        n += int(tile.sum())
        first = first or time.perf_counter()
    for sid, cols in parts.items():
        order = np.argsort(np.concatenate(cols["index"]), kind="stable")
        write_slide_features(out, sid, np.concatenate(cols["features"])[order],
                             np.concatenate(cols["coords"])[order], info.name)
    return {"images": n, "seconds": time.perf_counter() - start, "startup": (first or start) - start,
            "driver_bytes": received}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--tiles-per-slide", type=int, default=128)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float16", "float32"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("ray", "ray.data", "gpfm_scale"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray

    from benchmarks.bench_embed import write_cohort

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="bench-embed-sink-"))
    cfg = config(args.dim, args.dtype)
    runs: dict[str, list[dict[str, Any]]] = {"driver": [], "workers": []}
    try:
        root = write_cohort(work / "cohort", args.slides, args.tiles_per_slide, tile_px=32)
        run_workers(cfg, write_cohort(work / "warm", 2, 16, tile_px=32), work / "warm-out")  # Ray workers exist
        for repeat in range(args.repeats):
            for side, fn in (("driver", run_driver), ("workers", run_workers)):
                out = work / f"out-{side}-{repeat}"
                r = fn(cfg, root, out)
                r["load1"] = os.getloadavg()[0]
                runs[side].append(r)
                log.info("%s: %d img in %.1f s (start-up %.1f s), driver got %.1f B/img, load %.1f", side,
                         r["images"], r["seconds"], r["startup"], r["driver_bytes"] / r["images"], r["load1"])
                shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| side | tiles | D | dtype | driver bytes / tile | e2e img/s | busy img/s (fastest of {args.repeats}) |")
    print("|---|---|---|---|---|---|---|")
    for side, rs in runs.items():
        e2e = max(r["images"] / r["seconds"] for r in rs)
        busy = max(r["images"] / (r["seconds"] - r["startup"]) for r in rs)
        print(f"| {side} | {rs[0]['images']} | {args.dim} | {args.dtype} | "
              f"{rs[0]['driver_bytes'] / rs[0]['images']:.1f} | {e2e:.0f} | {busy:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
