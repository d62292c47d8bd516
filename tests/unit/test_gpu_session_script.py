"""benchmarks/gpu_session.sh on CPU: its syntax, its plan, and its bookkeeping with a stand-in interpreter.

No GPU is needed: `PY` points at a stub that hands the script's own bookkeeping (`python -`, `python -c`) to the real
interpreter and answers every benchmark command itself, so what runs is the script's order, time budget, per-part
records and JSON files. What the benchmarks measure on a GPU is not tested here.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"
ORDER = ["objective", "embed", "pytest_gpu", "pretrain"]  # the issue: objective first, then embedding, then the rest

STUB = """#!/usr/bin/env bash
case "$1" in
  -|-c) exec {python} "$@" ;;
  benchmarks/bench_objective.py) echo '{{"mfu": 0.41, "teacher_param_dtype": "float32"}}' > "${{@: -1}}" ;;
  *) echo "stub cannot run $*" >&2; exit 3 ;;
esac
"""


def _stub(tmp_path: Path) -> Path:
    stub = tmp_path / "py"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return stub


def _session(tmp_path: Path, budget: int) -> Path:
    out = tmp_path / "out"
    env = {**os.environ, "PY": str(_stub(tmp_path)), "BUDGET_S": str(budget), "OUT": str(out)}
    subprocess.run(["bash", str(SCRIPT)], env=env, check=True, capture_output=True, timeout=120)
    return out


def test_script_parses_and_plans_the_objective_first():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    plan = subprocess.run(["bash", str(SCRIPT), "plan"], check=True, capture_output=True, text=True).stdout
    parts = [line.split()[1].rstrip(":") for line in plan.splitlines() if line.startswith("--- ")]
    assert parts == ORDER
    assert "bench_objective.py --preset vitl --device cuda" in plan and '"$OUT/objective.json"' in plan


def test_session_records_every_part_in_order_and_leaves_one_json_each(tmp_path):
    budget = 400
    out = _session(tmp_path, budget)
    summary = json.loads((out / "summary.json").read_text())
    assert [p["part"] for p in summary["parts"]] == ORDER
    assert summary["budget_s"] == budget and summary["install_rc"] != 0  # no build/gpu-deps here
    rc = {p["part"]: p["rc"] for p in summary["parts"]}
    assert rc == {"objective": 0, "embed": 3, "pytest_gpu": 3, "pretrain": 3}
    assert json.loads((out / "objective.json").read_text())["teacher_param_dtype"] == "float32"  # the part's own
    embed = json.loads((out / "embed.json").read_text())  # a part that wrote nothing gets a record saying so
    assert embed["error"] == "no JSON written" and "stub cannot run" in embed["log_tail"]
    limits = [p["limit_s"] for p in summary["parts"]]
    assert limits == [110, 100, 60, 240]  # each part's cap: the budget is not binding at 400 s with instant parts
    assert sorted(f.name for f in out.iterdir()) == sorted(["summary.json", "session.log",
                                                            *(f"{p}.json" for p in ORDER)])  # <= 8 files come back


def test_parts_that_the_budget_cannot_fit_are_skipped_not_run(tmp_path):
    out = _session(tmp_path, budget=24)  # 24 s - 10 s kill grace leaves under the 15-s minimum for any part
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["part"], p["skipped"]) for p in summary["parts"]] == [(p, True) for p in ORDER]
    assert json.loads((out / "objective.json").read_text())["error"] == "skipped: budget spent"
