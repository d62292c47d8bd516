"""Smoke test of benchmarks/bench_pretrain.py (`--quick`), so the benchmark keeps running as the job evolves.

No speed is asserted (the machine is shared). What is checked: the baseline and the job train the same model on the
same batch (equal step-1 loss), every run reports every step, the summary's figures follow from the rows (steady
images/s, expert share, ratio = job / baseline), and the JSON is written.
"""

from __future__ import annotations

import json
import statistics

import pytest

from tests.benchmark_scripts import import_benchmark



@pytest.mark.slow  # Ray Train worker start-up + DeepSpeed init: ~45 s on 2 cores
def test_quick_run_compares_the_same_training_and_writes_json(ray_session, tmp_path):
    bench_pretrain = import_benchmark("bench_pretrain")

    out = tmp_path / "bench.json"
    bench_pretrain.main(["--quick", "--no-gpu", "--experts", "remote", "--stand-in", "test_gpu",
                         "--work", str(tmp_path / "work"), "--json", str(out)])
    cpu = json.loads(out.read_text())["cpu"]
    base, job = cpu["runs"]
    assert (base["kind"], job["kind"], job["experts"]) == ("baseline", "job", "remote")
    assert [r["step"] for r in base["rows"]] == [r["step"] for r in job["rows"]] == [1, 2, 3, 4, 5]
    assert job["rows"][0]["total"] == pytest.approx(base["rows"][0]["total"], rel=1e-5)
    summary = {f["kind"]: f for f in cpu["summary"]}
    mean_step = statistics.fmean(r["step_s"] for r in job["rows"][1:])  # --quick: batch 8, 1 warm-up step
    assert summary["job"]["steady"] == pytest.approx(8 / mean_step)
    mean_wait = statistics.fmean(r["expert_wait_s"] for r in job["rows"][1:])
    assert summary["job"]["expert_share"] == pytest.approx(mean_wait / mean_step)
    assert summary["job"]["ratio_steady"] == pytest.approx(summary["job"]["steady"] / summary["baseline"]["steady"])
    assert cpu["goals"]["expert_share/remote/fp32"] == summary["job"]["expert_share"]
    assert summary["job"]["wall"] > 0 and summary["job"]["e2e"] > 0
