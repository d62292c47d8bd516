"""Smoke test of benchmarks/bench_tiling_bookkeeping.py on a tiny cohort, so it keeps running as the driver evolves.

No speed is asserted (the machine is shared); what is checked: the real driver ran every slide (the benchmark
itself asserts the replayed state equals the driver's), the counters add up, and the JSON is written.
"""

from __future__ import annotations

import json

from tests.benchmark_scripts import import_benchmark



def test_bookkeeping_benchmark_runs_and_accounts_for_every_slide(tmp_path):
    bench = import_benchmark("bench_tiling_bookkeeping")
    summary = bench.main(["--slides", "200", "--per-shard", "3", "--actors", "4", "--old-samples", "2",
                          "--dir", str(tmp_path), "--json", str(tmp_path / "s.json")])
    new = summary["new"]
    assert new["done"] + new["failed"] == 200 and new["failed"] == 3  # slides 0, 97, 194 fail
    assert summary["commits"] == new["commits"] > 200 // 3
    assert summary["old"]["total_s_extrapolated"] > 0 and new["total_s"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["slides"] == 200
