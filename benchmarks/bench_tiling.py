"""Tiling benchmark: gpfm-scale's tiling stage vs a GPFM/CLAM-style baseline, on the same slides and tile grid.

The baseline is GPFM's `Patching/extract_images.py` (CLAM lineage): per slide, OpenSlide `read_region` per tile,
`.convert('RGB')` (plus a PIL resize when resampling, as CLAM's feature bags do), PIL JPEG encode, one JPEG file
per tile on disk; all cores = a multiprocessing Pool with one slide per task. Ours is `gpfm_scale.tiling.stage.run`
(Ray actors, cuCIM batched reads, simplejpeg encode or zero-decode copy, WebDataset shards), and the bare per-slide
function `tile_slide` without Ray, so the Ray overhead shows.

Both sides get the same coordinates: the grid is planned once per slide with the project's own code (the steps
`tile_slide` runs: tissue mask, `plan_grid`), given to the baseline as a list, and checked against the coordinates
our stage writes (`coords/{slide}.h5`). Ours also does work the baseline does not (tissue mask, grid, coordinate
file, QC thumbnail per slide): GPFM ran those in a separate step, so the comparison is conservative for ours.

Timing: Ray is started before any clock runs; process pools are started and warmed (imports done) before timing,
for the baseline and the bare function alike. `stage` = the stage's own wall time (`TilingResult.seconds`: actor
start, dispatch, shard commit included); `steady` = tiles over the sum of the per-slide busy seconds the stage
records in its manifest: the rate of one busy worker, compared per core with baseline tiles/s divided by workers.
`bare` and `baseline` with N workers are wall-clock rates of N processes. Because the cores are shared with other
work, `bare` and `baseline` also report tiles per CPU-second (each process's own CPU time, threads included):
the per-core figure least disturbed by neighbours.

Run: python benchmarks/bench_tiling.py [--slides 4] [--size 8192] [--repeats 2] [--modes decode,zero_decode,resampled]
     [--workers 1,2] [--real SLIDE] [--work DIR] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.shards import ShardWriter
from gpfm_scale.slides.config import GridConfig
from gpfm_scale.slides.grid import TileGrid, plan_grid
from gpfm_scale.slides.mpp import resolve_mpp
from gpfm_scale.slides.open import open_slide
from gpfm_scale.slides.synthetic import write_synthetic_slide
from gpfm_scale.slides.tissue import choose_mask_level, mask_from_level, mask_width
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.slide_job import SlideTask, tile_slide

log = logging.getLogger("bench_tiling")

JPEG_QUALITY = 90
MIN_TISSUE_FRACTION = 0.05
"""Low on purpose: thousands of tiles from a few slides, background-only tiles dropped as any tiler would."""
STORED_TILE_PX = 256
SLIDE_MPP = 0.25
TARGETS = {"decode": 3.0, "zero_decode": 15.0}
"""Issue targets: ours / baseline tiles/s per core."""


@dataclass(frozen=True)
class Mode:
    name: str
    tile_px: int
    target_mpp: float | None
    what: str


MODE_NAMES = ("decode", "zero_decode", "resampled")


def build_modes(stored_tile_px: int) -> dict[str, Mode]:
    """The benchmark's modes for slides stored in `stored_tile_px` tiles (zero-decode cuts exactly those)."""
    return {m.name: m for m in (
        Mode("decode", 224, None, f"level 0, 224-px tiles (stored: {stored_tile_px}): read + JPEG encode"),
        Mode("zero_decode", stored_tile_px, None, f"level 0, {stored_tile_px}-px tiles on the stored tiles: copied"),
        Mode("resampled", 224, 0.5, "0.5 µm/px from the finest level at least as fine (synthetic 0.25 µm/px: "
             "448-px reads) resized to 224 + encode"),
    )}


@dataclass(frozen=True)
class BenchSlide:
    slide_id: str
    path: str


@dataclass(frozen=True)
class BaselineJob:
    """One slide for the baseline: where to read (level-0 top-left coords) and where to write one JPEG per tile."""

    path: str
    out_dir: str
    coords: tuple[tuple[int, int], ...]
    level: int
    read_px: int
    tile_px: int


@dataclass
class Measurement:
    mode: str
    workers: int
    impl: str
    repeat: int
    tiles: int
    seconds: float
    cpu_seconds: float | None = None

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def tiles_per_cpu_s(self) -> float | None:
        return self.tiles / self.cpu_seconds if self.cpu_seconds else None


def tiling_config(mode: Mode, workers: int) -> TilingConfig:
    grid = GridConfig(tile_px=mode.tile_px, target_mpp=mode.target_mpp, min_tissue_fraction=MIN_TISSUE_FRACTION,
                      max_tiles_per_slide=None)
    return TilingConfig(grid=grid, device="cpu", jpeg_quality=JPEG_QUALITY, workers=workers, run_name="bench")


def real_slides(folder: Path, path: str, num: int) -> list[BenchSlide]:
    """`num` links to one real slide under distinct ids: real pixels and JPEG tables, repeated for volume."""
    folder.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(num):
        link = folder / f"real{i:02d}{Path(path).suffix}"
        if not link.exists():
            link.symlink_to(os.path.abspath(path))
        slides.append(BenchSlide(link.stem, str(link)))
    return slides


def stored_tile_px(slide: BenchSlide) -> int:
    with open_slide(slide.path, ("cucim", "openslide")) as reader:
        layout = reader.raw_tile_layout(0)
    if layout is None or layout.tile_width != layout.tile_height:
        raise RuntimeError(f"{slide.path}: level 0 has no square stored JPEG tiles, so no zero-decode mode")
    return layout.tile_width


def make_slides(folder: Path, num: int, size: int) -> list[BenchSlide]:
    """`num` synthetic size x size Aperio-style slides (0.25 µm/px, 256-px JPEG tiles); reused when present."""
    folder.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(num):
        path = folder / f"bench{size}_{i:02d}.svs"
        if not path.exists():
            tmp = path.with_name(f".{path.stem}.partial.svs")
            write_synthetic_slide(tmp, size, size, mpp=SLIDE_MPP, tile=STORED_TILE_PX, levels=3, seed=i)
            os.replace(tmp, path)
        slides.append(BenchSlide(path.stem, str(path)))
    return slides


def plan_slide_grid(slide: BenchSlide, cfg: TilingConfig) -> TileGrid:
    """The grid `tile_slide` will cut, computed with the same project functions and config."""
    with open_slide(slide.path, cfg.readers, "cpu") as reader:
        mpp0, _ = resolve_mpp(reader.mpp, None, cfg.fallback_mpp, slide.slide_id)
        dims, downsamples = reader.level_dimensions, reader.level_downsamples
        level = choose_mask_level(dims, mask_width(dims[0][0], mpp0, cfg.tissue))
        mask, mask_ds = mask_from_level(reader.read_level(level), downsamples[level], mpp0, cfg.tissue)
        return plan_grid(dims, downsamples, mpp0, cfg.grid, mask, mask_ds, slide.slide_id)


def baseline_job(slide: BenchSlide, grid: TileGrid, out_dir: Path) -> BaselineJob:
    coords = tuple((int(x), int(y)) for x, y in grid.coords)
    return BaselineJob(slide.path, str(out_dir), coords, grid.read_level, grid.read_size_px, grid.tile_px)


def baseline_slide(job: BaselineJob) -> tuple[int, float]:
    """GPFM's extract_images.read_images: OpenSlide read_region -> RGB (-> resize) -> one JPEG file per tile.

    Returns (tiles, CPU seconds of this process spent on them).
    """
    import openslide
    from PIL import Image

    cpu = time.process_time()
    os.makedirs(job.out_dir, exist_ok=True)
    slide = openslide.OpenSlide(job.path)
    try:
        for x, y in job.coords:
            img = slide.read_region((x, y), job.level, (job.read_px, job.read_px)).convert("RGB")
            if job.read_px != job.tile_px:
                img = img.resize((job.tile_px, job.tile_px), Image.BICUBIC)
            img.save(os.path.join(job.out_dir, f"{x}_{y}_{job.tile_px}_{job.tile_px}.jpg"), quality=JPEG_QUALITY)
    finally:
        slide.close()
    return len(job.coords), time.process_time() - cpu


def bare_tile(args: tuple[list[SlideTask], dict[str, Any], str]) -> tuple[int, float]:
    """What one tiling actor does, without Ray: `tile_slide` each slide into one shard writer, then seal it.

    Returns (tiles, CPU seconds of this process, cuCIM's threads included).
    """
    tasks, cfg_dict, out_url = args
    cpu = time.process_time()
    cfg = TilingConfig.model_validate(cfg_dict)
    out = OutputDir(out_url)
    writer = ShardWriter(out.local_tmp_dir(), cfg.shard_max_bytes)
    tiles = 0
    for task in tasks:
        outcome = tile_slide(task, cfg, writer, out, "cpu")
        if not outcome.ok:
            raise RuntimeError(f"bare tile_slide failed on {task.slide_id}: {outcome.reason}")
        writer.commit_slide(task.slide_id, outcome.n_tiles)
        tiles += outcome.n_tiles
    writer.seal()
    return tiles, time.process_time() - cpu


def _warm(_: int) -> int:
    """Import what the timed work imports, so process start-up stays out of the clock (same for both sides)."""
    import cucim  # noqa: F401
    import openslide  # noqa: F401
    import PIL.Image  # noqa: F401

    time.sleep(0.2)  # hold this worker so the next warm-up call lands on another one
    return os.getpid()


def start_pool(workers: int) -> Any:
    """A warmed spawn pool (spawn: the driver runs Ray and cuCIM threads, which a fork would copy mid-state)."""
    pool = mp.get_context("spawn").Pool(workers)
    pool.map(_warm, range(workers), chunksize=1)
    return pool


def _totals(start: float, parts: list[tuple[int, float]]) -> tuple[int, float, float]:
    """(tiles, wall seconds since `start`, CPU seconds summed over processes)."""
    return sum(p[0] for p in parts), time.perf_counter() - start, sum(p[1] for p in parts)


def time_baseline(jobs: list[BaselineJob], pool: Any | None) -> tuple[int, float, float]:
    start = time.perf_counter()
    parts = pool.map(baseline_slide, jobs, chunksize=1) if pool else [baseline_slide(j) for j in jobs]
    return _totals(start, parts)


def time_bare(tasks: list[SlideTask], cfg: TilingConfig, out: Path, pool: Any | None) -> tuple[int, float, float]:
    OutputDir(str(out)).makedirs()
    cfg_dict = cfg.model_dump(mode="json")
    start = time.perf_counter()
    if pool:
        parts = pool.map(bare_tile, [([t], cfg_dict, str(out)) for t in tasks], chunksize=1)
    else:
        parts = [bare_tile((tasks, cfg_dict, str(out)))]
    return _totals(start, parts)


def time_stage(manifest: Path, cfg: TilingConfig, out: Path, grids: dict[str, TileGrid]) -> tuple[int, float, float]:
    """(tiles, stage seconds, per-slide busy seconds); checks the stage cut exactly the planned grid."""
    from gpfm_scale.tiling import stage

    result = stage.run(cfg, str(manifest), str(out))
    if not result.ok:
        raise RuntimeError(f"stage failed: {result.failed}")
    for sid, grid in grids.items():
        with h5py.File(out / "coords" / f"{sid}.h5", "r") as f:
            if not np.array_equal(f["coords"][:], grid.coords):
                raise RuntimeError(f"{sid}: the stage cut another grid than the baseline was given")
    busy = float(pd.read_parquet(result.manifest)["seconds"].sum())
    return result.n_tiles, result.seconds, busy


def measure_cell(mode: Mode, workers: int, repeat: int, ctx: dict[str, Any]) -> list[Measurement]:
    """Baseline, bare function and stage for one (mode, workers), each on fresh output folders."""
    cfg = tiling_config(mode, workers)
    grids = {s.slide_id: plan_slide_grid(s, cfg) for s in ctx["slides"]}
    run_dir = Path(tempfile.mkdtemp(prefix=f"{mode.name}-w{workers}-", dir=ctx["work"]))
    pool = ctx["pools"].get(workers)
    jobs = [baseline_job(s, grids[s.slide_id], run_dir / "baseline" / s.slide_id) for s in ctx["slides"]]
    tasks = [SlideTask(s.slide_id, s.path) for s in ctx["slides"]]
    expected = sum(len(g) for g in grids.values())
    if expected == 0:
        raise RuntimeError(f"{mode.name}: the grid holds no tile; use bigger slides (--size)")
    out: list[Measurement] = []
    try:
        out.append(Measurement(mode.name, workers, "baseline", repeat, *time_baseline(jobs, pool)))
        out.append(Measurement(mode.name, workers, "bare", repeat, *time_bare(tasks, cfg, run_dir / "bare", pool)))
        tiles, secs, busy = time_stage(ctx["manifest"], cfg, run_dir / "stage", grids)
        out.append(Measurement(mode.name, workers, "stage", repeat, tiles, secs))
        out.append(Measurement(mode.name, workers, "steady", repeat, tiles, busy))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    for m in out:
        if m.tiles != expected:
            raise RuntimeError(f"{m.impl} wrote {m.tiles} tiles, the grid has {expected}")
    return out


def summarize(runs: list[Measurement]) -> list[dict[str, Any]]:
    """Best tiles/s (of the repeats) per (mode, workers, impl), all repeats listed, and ours / baseline ratios."""
    rows = []
    frame = pd.DataFrame([{**asdict(m), "tps": m.tiles_per_s, "tpc": m.tiles_per_cpu_s} for m in runs])
    for (mode, workers), cell in frame.groupby(["mode", "workers"], sort=False):
        row: dict[str, Any] = {"mode": mode, "workers": int(workers), "tiles": int(cell["tiles"].iloc[0])}
        for impl, part in cell.groupby("impl"):
            row[impl] = float(part["tps"].max())
            row[f"{impl}_all"] = [round(float(v), 1) for v in part["tps"]]
            if part["tpc"].notna().all():
                row[f"{impl}_cpu"] = float(part["tpc"].max())
                row[f"{impl}_cpu_all"] = [round(float(v), 1) for v in part["tpc"]]
        for impl in ("stage", "bare"):
            row[f"ratio_{impl}"] = row[impl] / row["baseline"]
        row["ratio_steady"] = row["steady"] / (row["baseline"] / row["workers"])  # per core: busy rate per worker
        row["ratio_cpu"] = row["bare_cpu"] / row["baseline_cpu"]
        row["target"] = TARGETS.get(mode)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("mode", "workers", "tiles", "ours stage/s", "ours bare/s", "baseline/s", "stage x", "bare x",
            "ours steady/s/worker", "steady x per core", "bare/CPU-s", "baseline/CPU-s", "CPU x", "target")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        target = f">= {r['target']:g}x" if r["target"] else "-"
        cells = (r["mode"], r["workers"], r["tiles"], f"{r['stage']:.0f}", f"{r['bare']:.0f}", f"{r['baseline']:.0f}",
                 f"{r['ratio_stage']:.2f}", f"{r['ratio_bare']:.2f}", f"{r['steady']:.0f}", f"{r['ratio_steady']:.2f}",
                 f"{r['bare_cpu']:.0f}", f"{r['baseline_cpu']:.0f}", f"{r['ratio_cpu']:.2f}", target)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    return {"cpu_model": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, default=4, help="number of synthetic slides")
    p.add_argument("--size", type=int, default=8192, help="slide width = height in level-0 px")
    p.add_argument("--repeats", type=int, default=2, help="measurements per cell (the table shows the best)")
    p.add_argument("--modes", default=",".join(MODE_NAMES), help="comma list of " + ", ".join(MODE_NAMES))
    p.add_argument("--workers", default=None, help="comma list of worker counts (default: 1 and the CPU count)")
    p.add_argument("--real", default=None, help="use --slides links to this real slide instead of synthetic ones")
    p.add_argument("--work", default=None, help="folder for slides and outputs (default: a temporary one)")
    p.add_argument("--json", default=None, help="write every measurement and the summary here")
    p.add_argument("--quick", action="store_true", help="2 slides of 2048 px, 1 repeat: a smoke run, not figures")
    args = p.parse_args(argv)
    if args.quick:
        args.slides, args.size, args.repeats = 2, 2048, 1
    ncpu = os.cpu_count() or 1
    args.worker_counts = sorted({int(w) for w in args.workers.split(",")} if args.workers else {1, ncpu})
    args.mode_names = args.modes.split(",")
    unknown = set(args.mode_names) - set(MODE_NAMES)
    if unknown:
        p.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODE_NAMES}")
    return args


def run_benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write slides, start Ray and pools, measure every (repeat, mode, workers) cell, return results."""
    from gpfm_scale.ray_utils import ensure_ray

    if args.real:
        slides = real_slides(work / "slides", args.real, args.slides)
    else:
        slides = make_slides(work / "slides", args.slides, args.size)
    modes = build_modes(stored_tile_px(slides[0]))
    mode_list = [modes[name] for name in args.mode_names]
    manifest = work / "slides.csv"
    pd.DataFrame([asdict(s) for s in slides]).to_csv(manifest, index=False)
    ensure_ray("local")  # a fresh instance: never join a cluster another job left in /tmp/ray on a shared machine
    pools = {w: start_pool(w) for w in args.worker_counts if w > 1}
    _warm(0)  # the single-worker runs happen in this process: same imports done before the clock
    ctx = {"slides": slides, "manifest": manifest, "work": str(work), "pools": pools}
    runs: list[Measurement] = []
    try:
        for repeat in range(args.repeats):
            for mode in mode_list:
                for workers in args.worker_counts:
                    cell = measure_cell(mode, workers, repeat, ctx)
                    runs.extend(cell)
                    log.info("%s w=%d r=%d: %s", mode.name, workers, repeat,
                             ", ".join(f"{m.impl} {m.tiles_per_s:.0f}/s" for m in cell))
    finally:
        for pool in pools.values():
            pool.terminate()
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
            "args": {k: v for k, v in vars(args).items() if k not in ("worker_counts", "mode_names")},
            "modes": {m.name: m.what for m in mode_list}, "runs": [asdict(m) for m in runs],
            "summary": summarize(runs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.work:
        results = run_benchmark(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-tiling-") as tmp:
            results = run_benchmark(args, Path(tmp))
    print(format_table(results["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
