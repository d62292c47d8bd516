"""Mixing benchmark: how many slides a 96-tile training batch holds, from the tiler's shards and from mixed ones.

Cohort: `--slides` simulated slides of 20-60 tiny JPEG tiles (16 px, a few hundred bytes each: the figures depend on
tile counts and shard layout, not on pixels) written by the tiler's own `ShardWriter` in the tiler's layout:
`--writers` tiling actors, each with its open shard, take slides in turn, close a shard at the first slide
boundary past `shard_max_bytes` and publish it as `shards/tiles-NNNNNN.tar` (whole slides per shard). The cap is
set so a shard holds ~`--slides-per-shard` slides, as a 1 GB shard of GPFM's cohort does (190M tiles of 72k
slides: ~2,600 tiles x ~12 KB = ~32 MB per slide, ~30 slides per shard).

Measured, for each loader (the real `build_loader`, torch backend, in this process, GPFM settings: batch 96,
shuffle buffer 1,000, 4 open shards, random start; tiny crops since only composition matters):
  - distinct slides per batch, mean and min, against the exact uniform expectation for drawing 96 tiles without
    replacement from the cohort's tiles: sum over slides of 1 - C(N - n_s, 96) / C(N, 96);
  - the largest share of one slide in any batch;
  - bytes read per delivered sample: bytes the process read (/proc/self/io rchar, Ray shut down so its sockets do
    not count) over the tar bytes (headers included) of the samples the batches hold; over the whole run and
    after the first batch (the first fills the 1,000-sample shuffle buffer, once per data epoch of a stream).
and the mixing stage (`gpfm_scale.data.mixing.run`, Ray started before the clock) in samples/s.
`old` = the tiler's shards; `old-interleaveK` = the tiler's shards with K open shards per worker (the
alternative to mixing); `mixed` = the output of `gpfm-scale mix`.

Run: python benchmarks/bench_mixing.py [--slides 2000] [--batches 100] [--widths 64] [--work DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch

from gpfm_scale.contracts.shards import ShardWriter
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader_config import LoaderConfig
from gpfm_scale.data.mixing import MixConfig, run
from gpfm_scale.data.shard_stream import build_loader

log = logging.getLogger("bench_mixing")
# Composition does not depend on the augmentations: crops only, so the loaders' time goes to reading and decoding.
CROPS = CropConfig(global_size=16, local_size=8, n_local=1, hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                   blur_p_global1=0.0, blur_p_global2=0.0, blur_p_local=0.0, solarize_p_global2=0.0)
GRID = (2, 2)
BLOCK = 512


def _footprint(files: dict[str, bytes]) -> int:
    """Tar bytes of one sample as ShardWriter writes it (short names: one header per member)."""
    return sum(BLOCK + -(-len(p) // BLOCK) * BLOCK for p in files.values())


def write_cohort(root: Path, n_slides: int, writers: int, slides_per_shard: int, seed: int
                 ) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """The tiler's layout from its own writer. Returns shard paths, tiles per slide, tar bytes per key."""
    rng = np.random.default_rng(seed)
    counts = {f"slide{s:05d}": int(rng.integers(20, 61)) for s in range(n_slides)}
    cap = slides_per_shard * 40 * 2 * 2 * BLOCK  # ~40 tiles x 2 members x (header + ~1 block payload)
    out = root / "shards"
    out.mkdir(parents=True)
    pool = [ShardWriter(root / "tmp", cap) for _ in range(writers)]
    paths: list[str] = []
    footprint: dict[str, int] = {}

    def publish(sealed: Any) -> None:
        if sealed is not None:
            paths.append(str(out / f"tiles-{len(paths):06d}.tar"))
            os.replace(sealed.tmp_path, paths[-1])

    for s, (slide, n) in enumerate(counts.items()):
        writer = pool[s % writers]
        writer.begin_slide()
        colour = rng.integers(0, 256, 3)
        for j in range(n):
            tile = np.clip(colour + rng.normal(0, 12, (16, 16, 3)), 0, 255).astype(np.uint8)
            x, y = 256 * (j % 8), 256 * (j // 8)
            meta = {"slide_id": slide, "x": x, "y": y, "level": 0, "tile_px": 256, "mpp": 0.5,
                    "magnification": 20.0, "tissue_fraction": 0.9, "reader": "bench"}
            files = {"jpg": simplejpeg.encode_jpeg(tile, quality=90, colorsubsampling="420"),
                     "json": json.dumps(meta).encode()}
            writer.add(f"{slide}/{x}_{y}", files)
            footprint[f"{slide}/{x}_{y}"] = _footprint(files)
        publish(writer.commit_slide(slide, n))
    for writer in pool:
        publish(writer.seal())
    return paths, counts, footprint


def expected_distinct(counts: list[int], batch: int) -> float:
    """E[distinct slides] among `batch` tiles drawn without replacement from all tiles (slide s has counts[s])."""
    total = sum(counts)
    out = 0.0
    for n in counts:
        absent = math.exp(sum(math.log((total - n - i) / (total - i)) for i in range(batch))) if total - n >= batch \
            else 0.0
        out += 1.0 - absent
    return out


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def measure_loader(urls: list[str], cfg: LoaderConfig, batches: int, footprint: dict[str, int]) -> dict[str, Any]:
    loader = build_loader(cfg.model_copy(update={"shards": urls}), CROPS, MaskConfig(), GRID, 0, 1)
    distinct, top_share, delivered = [], 0.0, [0, 0]
    start, t0 = _rchar(), time.perf_counter()
    for i in range(batches):
        batch = next(loader)
        if i == 0:
            after_fill = _rchar()
        slides = Counter(m["json"]["slide_id"] for m in batch["meta"])
        distinct.append(len(slides))
        top_share = max(top_share, max(slides.values()) / len(batch["meta"]))
        delivered[i > 0] += sum(footprint[m["__key__"]] for m in batch["meta"])
    end = _rchar()
    return {"distinct_mean": float(np.mean(distinct)), "distinct_min": int(min(distinct)),
            "top_share": top_share, "bytes_read_per_sample_byte": (end - start) / sum(delivered),
            "steady_bytes_read_per_sample_byte": (end - after_fill) / delivered[1],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=4, help="Simulated tiling actors (open shards while tiling).")
    parser.add_argument("--slides-per-shard", type=int, default=30)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--widths", default="64", help="Open-shard widths of the interleave-only variant.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="Scratch folder (default: a temp dir).")
    parser.add_argument("--json", help="Write the figures here too.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny crops: one intra-op thread is several times faster than two contended ones
    root = Path(args.work or tempfile.mkdtemp(prefix="bench-mixing-"))
    t0 = time.perf_counter()
    paths, counts, footprint = write_cohort(root / "tiles", args.slides, args.writers, args.slides_per_shard,
                                            args.seed)
    n_tiles, shard_bytes = sum(counts.values()), sum(os.path.getsize(p) for p in paths)
    log.info("cohort: %d slides, %d tiles, %d shards (%.1f MB) written in %.1f s", len(counts), n_tiles, len(paths),
             shard_bytes / 1e6, time.perf_counter() - t0)
    cfg = LoaderConfig(backend="torch", batch_size=96, num_workers=0, shuffle_buffer=1000, open_shards=4,
                       epoch_length=1250, seed=args.seed)
    expected = expected_distinct(list(counts.values()), cfg.batch_size)
    rows: dict[str, dict[str, Any]] = {"old": measure_loader(paths, cfg, args.batches, footprint)}
    for width in (int(w) for w in args.widths.split(",") if w):
        rows[f"old-interleave{width}"] = measure_loader(paths, cfg.model_copy(update={"open_shards": width}),
                                                       args.batches, footprint)

    import ray

    from gpfm_scale.ray_utils import ensure_ray

    ensure_ray()
    result = run(MixConfig(seed=args.seed, shard_bytes=math.ceil(shard_bytes / len(paths))), str(root / "tiles"),
                 str(root / "mixed"))
    ray.shutdown()
    mixed = sorted(str(p) for p in (root / "mixed" / "shards").glob("*.tar"))
    rows["mixed"] = measure_loader(mixed, cfg, args.batches, footprint)
    figures = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_average": os.getloadavg(), "slides": len(counts), "tiles": n_tiles,
               "tiler_shards": len(paths), "mixed_shards": result.n_shards, "uniform_expected_distinct": expected,
               "mix_seconds": result.seconds, "mix_samples_per_second": result.samples_per_second,
               "mix_problems": result.problems, "loaders": rows}
    print(f"\n{len(counts)} slides, {n_tiles} tiles, {len(paths)} tiler shards -> {result.n_shards} mixed shards; "
          f"uniform expectation {expected:.2f} distinct slides per 96-tile batch")
    print("| loader | distinct slides / batch (mean, min) | % of uniform | largest share of one slide | "
          "bytes read / sample byte (whole run, after the first batch) |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['distinct_mean']:.1f}, {r['distinct_min']} | {100 * r['distinct_mean'] / expected:.0f}% "
              f"| {r['top_share']:.2f} | {r['bytes_read_per_sample_byte']:.3f}, "
              f"{r['steady_bytes_read_per_sample_byte']:.3f} |")
    print(f"mix stage: {result.n_samples} samples in {result.seconds:.1f} s = {result.samples_per_second:.0f} "
          f"samples/s (load average {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
