"""Shard reader benchmark (issue 13.4): our tar reader vs webdataset's own pipeline, decoded samples per second.

The question: should the torch loader read shards through webdataset's stages (ResampledShards ->
tarfile_to_samples -> shuffle -> decode, corrupt samples to a handler) instead of `data/tar_samples.py`? The issue
keeps webdataset unless it is more than 10% slower. Both readers run here in one process on the same shards, one
after the other in alternating order, `--repeats` times; each delivers `--samples` decoded samples (image as a
uint8 [3, H, W] tensor + the json dict), from shards drawn with replacement through a 1,000-sample shuffle buffer,
as the loader reads them (one stream: a DataLoader worker runs one such stream each, so per-stream rate x workers
is the loader's reading rate).

Readers:
  - ours: the loader's own stream of one data epoch (`shard_stream.decoded_samples`: resampled shards -> shuffle
    buffer -> decode) at the loader's defaults (4 open shards, random start) and at webdataset's shape (1 open
    shard, from the first sample);
  - webdataset: `wds.DataPipeline(ResampledShards, tarfile_to_samples, shuffle, decode("torchrgb8"))` with
    `warn_and_continue` handlers: what a webdataset user writes (PIL decodes the images);
  - webdataset + simplejpeg: the same pipeline with our strict decoder as its image handler, which isolates the
    tar reading and the pipeline's per-sample overhead from the choice of JPEG decoder.

Shards: `--shards` tiler-layout shards (whole slides, written by the tiler's `ShardWriter`) of synthetic H&E tiles
(`--tile` px, JPEG q90), `--tiles-per-shard` each. Also reported, for scale: the time of the multi-crop
augmentation of one sample at the GPFM crop sizes (what a loader worker spends per sample besides reading).

Run: python benchmarks/bench_shard_reader.py [--samples 4000] [--repeats 3] [--tile 224] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
import webdataset as wds

from gpfm_scale.contracts.shards import ShardWriter
from gpfm_scale.data.augmentations import MultiCropTransform
from gpfm_scale.data.config import CropConfig
from gpfm_scale.data.loader_config import LoaderConfig
from gpfm_scale.data.shard_stream import Counters, decoded_samples
from gpfm_scale.data.synthetic_tiles import make_tile
from gpfm_scale.data.tar_samples import decode_image_bytes

log = logging.getLogger("bench_shard_reader")
BUFFER = 1000


def _jpeg(chw: np.ndarray) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(chw.transpose(1, 2, 0)), quality=90, colorspace="RGB")


def write_shards(root: Path, n_shards: int, per_shard: int, tile: int, seed: int) -> list[str]:
    """Tiler-layout shards: slides of 50 tiles, whole slides per shard, through the tiler's writer."""
    rng = np.random.default_rng(seed)
    pool = [_jpeg(make_tile(i % 2, tile, rng)) for i in range(64)]
    out = root / "shards"
    out.mkdir(parents=True)
    paths = []
    for s in range(n_shards):
        writer = ShardWriter(root / "tmp", max_bytes=10**12)
        for slide in range(per_shard // 50):
            sid = f"s{s:03d}-{slide:02d}"
            writer.begin_slide()
            for t in range(50):
                meta = json.dumps({"slide_id": sid, "x": t * tile, "y": 0}).encode()
                writer.add(f"{sid}/{t * tile}_0", {"jpg": pool[int(rng.integers(len(pool)))], "json": meta})
            writer.commit_slide(sid, 50)
        sealed = writer.seal()
        paths.append(str(out / f"tiles-{s:06d}.tar"))
        os.replace(sealed.tmp_path, paths[-1])
    return paths


def ours(urls: list[str], seed: int, open_shards: int, random_start: bool) -> Iterator[dict[str, Any]]:
    cfg = LoaderConfig(shards=urls, seed=seed, epoch_length=10**6, shuffle_buffer=BUFFER, open_shards=open_shards,
                       random_start=random_start)
    return decoded_samples(urls, cfg, (seed, 0, 0, 0), Counters())


def _strict_jpeg(key: str, data: bytes) -> torch.Tensor | None:
    """A webdataset image handler with our decoder (None: not an image, let the other handlers try)."""
    ext = key.rsplit(".", 1)[-1]
    return decode_image_bytes(data, ext) if ext in ("jpg", "png") else None


def webdataset_pipeline(urls: list[str], seed: int, image_handler: Any) -> Iterator[dict[str, Any]]:
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(BUFFER, initial=BUFFER, rng=random.Random(seed)),
        wds.decode(image_handler, handler=wds.warn_and_continue),
    )
    return iter(pipeline)


def measure(make: Callable[[], Iterator[dict[str, Any]]], n: int) -> dict[str, float]:
    """Wall and CPU seconds to draw `n` decoded samples (the shuffle buffer's first fill included, as in a run)."""
    t0, c0 = time.perf_counter(), time.process_time()
    it = make()
    for _ in range(n):
        sample = next(it)
        image = sample.get("image", sample.get("jpg"))
        assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape[0] == 3, type(image)
        meta = sample["json"]
        assert isinstance(meta, dict) and "slide_id" in meta
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"samples_per_s": n / wall, "samples_per_cpu_s": n / cpu, "wall_s": wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--tiles-per-shard", type=int, default=500)
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_shard_reader_"))
    urls = sorted(str(p) for p in (work / "shards").glob("*.tar")) if (work / "shards").is_dir() else []
    if not urls:
        urls = write_shards(work, args.shards, args.tiles_per_shard, args.tile, args.seed)
    size = sum(os.path.getsize(u) for u in urls)
    log.info("%d shards, %.1f MB, %d-px JPEG tiles", len(urls), size / 1e6, args.tile)

    readers: dict[str, Callable[[int], Iterator[dict[str, Any]]]] = {
        "ours (4 open shards, random start)": lambda s: ours(urls, s, 4, True),
        "ours (1 open shard, from the start)": lambda s: ours(urls, s, 1, False),
        "webdataset (PIL torchrgb8)": lambda s: webdataset_pipeline(urls, s, "torchrgb8"),
        "webdataset + simplejpeg": lambda s: webdataset_pipeline(urls, s, _strict_jpeg),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in readers}
    for r in range(args.repeats):
        order = list(readers) if r % 2 == 0 else list(reversed(readers))
        for name in order:
            runs[name].append(measure(lambda: readers[name](args.seed + r), args.samples))
            log.info("repeat %d %-38s %7.0f samples/s  %7.0f samples/CPU-s", r, name,
                     runs[name][-1]["samples_per_s"], runs[name][-1]["samples_per_cpu_s"])

    crops = MultiCropTransform(CropConfig())
    tile = make_tile(0, args.tile, np.random.default_rng(0))
    image = decode_image_bytes(_jpeg(tile), "jpg")
    t0 = time.perf_counter()
    for i in range(50):
        crops(image, torch.Generator().manual_seed(i))
    crop_ms = (time.perf_counter() - t0) / 50 * 1e3

    best = {name: max(m["samples_per_s"] for m in ms) for name, ms in runs.items()}
    best_cpu = {name: max(m["samples_per_cpu_s"] for m in ms) for name, ms in runs.items()}
    base = "ours (4 open shards, random start)"
    print(f"\n{'reader':40s} {'samples/s':>10s} {'/CPU-s':>8s} {'vs ours':>8s} {'ms/sample':>9s}")
    for name in readers:
        print(f"{name:40s} {best[name]:10.0f} {best_cpu[name]:8.0f} {best_cpu[name] / best_cpu[base]:8.2f} "
              f"{1e3 / best_cpu[name]:9.3f}")
    print(f"multi-crop augmentation of one sample (2 x 224 + 8 x 96, GPFM): {crop_ms:.1f} ms")
    summary = {"runs": runs, "best_samples_per_s": best, "best_samples_per_cpu_s": best_cpu, "crop_ms": crop_ms,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "webdataset": importlib.metadata.version("webdataset"),
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"work": str(work)}}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
