"""Smoke test of benchmarks/bench_tiling.py on tiny slides, so the benchmark keeps running as the stage evolves.

No speed is asserted (the machine is shared); what is checked: both tilers cut exactly the planned grid, the
summary's ratios are ours / baseline, and the CLI writes its JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.benchmark_scripts import import_benchmark



@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_tiling")


@pytest.fixture(scope="module")
def slides(bench, tmp_path_factory):
    return bench.make_slides(tmp_path_factory.mktemp("bench-slides"), 2, 2048)


def test_baseline_and_bare_cut_the_planned_grid(bench, slides, tmp_path):
    mode = bench.build_modes(256)["decode"]
    cfg = bench.tiling_config(mode, workers=1)
    grid = bench.plan_slide_grid(slides[0], cfg)
    assert len(grid) > 0 and grid.read_size_px == 224 and not grid.needs_resize
    job = bench.baseline_job(slides[0], grid, tmp_path / "base")
    coords = job.coords
    tiles, seconds, cpu = bench.time_baseline([job], None)
    files = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert tiles == len(grid) and seconds > 0 and cpu > 0
    assert files == sorted(f"{x}_{y}_224_224.jpg" for x, y in coords)
    assert Image.open(tmp_path / "base" / files[0]).size == (224, 224)
    tiles, _, _ = bench.time_bare([bench.SlideTask(slides[0].slide_id, slides[0].path)], cfg, tmp_path / "bare", None)
    assert tiles == len(grid)


def test_resampled_baseline_resizes_to_tile_px(bench, slides, tmp_path):
    cfg = bench.tiling_config(bench.build_modes(256)["resampled"], workers=1)
    grid = bench.plan_slide_grid(slides[0], cfg)
    assert grid.needs_resize and grid.read_size_px == 448  # 0.5 µm/px from 0.25 µm/px level 0
    x, y = (int(v) for v in grid.coords[0])
    job = bench.BaselineJob(slides[0].path, str(tmp_path), ((x, y),), grid.read_level, grid.read_size_px, 224)
    assert bench.baseline_slide(job)[0] == 1
    assert Image.open(tmp_path / f"{x}_{y}_224_224.jpg").size == (224, 224)


def test_baseline_pool_one_slide_per_process(bench, slides, tmp_path):
    cfg = bench.tiling_config(bench.build_modes(256)["zero_decode"], workers=2)
    grids = [bench.plan_slide_grid(s, cfg) for s in slides]
    jobs = [bench.baseline_job(s, g, tmp_path / s.slide_id) for s, g in zip(slides, grids)]
    pool = bench.start_pool(2)
    try:
        tiles, _, cpu = bench.time_baseline(jobs, pool)
    finally:
        pool.terminate()
    assert tiles == sum(len(g) for g in grids) and cpu > 0  # CPU time comes back from the pool's processes
    assert [len(list((tmp_path / s.slide_id).iterdir())) for s in slides] == [len(g) for g in grids]


def test_summary_ratios_are_ours_over_baseline(bench):
    runs = [bench.Measurement("decode", 1, "baseline", r, 100, s, 2 * s) for r, s in ((0, 1.0), (1, 0.5))]
    runs += [bench.Measurement("decode", 1, "stage", 0, 100, 0.25),
             bench.Measurement("decode", 1, "steady", 0, 100, 0.2),
             bench.Measurement("decode", 1, "bare", 0, 100, 0.1, 0.25)]
    runs += [bench.Measurement("decode", 2, impl, 0, 100, s, s) for impl, s in
             (("baseline", 0.5), ("stage", 0.25), ("steady", 0.4), ("bare", 0.1))]
    row, row2 = bench.summarize(runs)
    assert row["baseline"] == 200.0 and row["baseline_all"] == [100.0, 200.0]  # best of the repeats
    assert row["ratio_stage"] == pytest.approx(2.0)
    assert row["ratio_steady"] == pytest.approx(2.5)
    assert row["ratio_bare"] == pytest.approx(5.0)
    assert row["target"] == 3.0
    assert row["baseline_cpu"] == 100.0 and row["bare_cpu"] == 400.0 and row["ratio_cpu"] == pytest.approx(4.0)
    assert "| decode | 1 | 100 | 400 | 1000 | 200 | 2.00 | 5.00 | 500 | 2.50 | 400 | 100 | 4.00 | >= 3x |" in \
        bench.format_table([row])
    # 2 workers: steady is one worker's busy rate (250/s) against the baseline's rate per process (200/s / 2)
    assert row2["workers"] == 2 and row2["ratio_steady"] == pytest.approx(2.5)


def test_cli_quick_runs_stage_and_writes_json(bench, ray_session, tmp_path):
    out = tmp_path / "results.json"
    bench.main(["--quick", "--modes", "zero_decode", "--workers", "1", "--work", str(tmp_path / "w"),
                "--json", str(out)])
    results = json.loads(out.read_text())
    impls = {r["impl"] for r in results["runs"]}
    assert impls == {"baseline", "bare", "stage", "steady"}
    tiles = {r["tiles"] for r in results["runs"]}
    assert len(tiles) == 1 and tiles.pop() > 0  # every implementation wrote the same number of tiles
    (row,) = results["summary"]
    assert row["mode"] == "zero_decode" and row["workers"] == 1
    assert np.isclose(row["ratio_stage"], row["stage"] / row["baseline"])


def test_real_slide_copies_are_links_with_its_stored_tiles(bench, real_svs, tmp_path):
    slides = bench.real_slides(tmp_path, str(real_svs), 2)
    assert [s.slide_id for s in slides] == ["real00", "real01"]
    assert Path(slides[1].path).resolve() == real_svs.resolve()
    assert bench.stored_tile_px(slides[1]) == 240  # CMU-1-Small-Region: 240x240 JPEG tiles (shared/data README)
