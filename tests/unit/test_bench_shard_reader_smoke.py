"""Smoke test of benchmarks/bench_shard_reader.py on two tiny shards, so the reader comparison keeps running.

No speed is asserted (the machine is shared): every reader delivers the samples it was asked for (the benchmark
checks each is a uint8 RGB tensor with its json) and the JSON summary is written.
"""

from __future__ import annotations

import json

from tests.benchmark_scripts import import_benchmark



def test_shard_reader_benchmark_runs_every_reader(tmp_path):
    bench = import_benchmark("bench_shard_reader")
    summary = bench.main(["--samples", "150", "--repeats", "1", "--shards", "2", "--tiles-per-shard", "100",
                          "--tile", "32", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "s.json")])
    assert len(summary["runs"]) == 4
    assert all(len(runs) == 1 and runs[0]["samples_per_s"] > 0 for runs in summary["runs"].values())
    assert len(list((tmp_path / "w" / "shards").glob("*.tar"))) == 2
    assert json.loads((tmp_path / "s.json").read_text())["best_samples_per_s"] == summary["best_samples_per_s"]
