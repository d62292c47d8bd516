"""The scripts of benchmarks/ as modules, for their smoke tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str) -> ModuleType:
    """benchmarks/{name}.py imported by name. benchmarks/ stays on sys.path (appended: it shadows nothing) for the
    rest of the session, since the pool workers a benchmark spawns import it again by name."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.append(str(BENCH_DIR))
    return importlib.import_module(name)
