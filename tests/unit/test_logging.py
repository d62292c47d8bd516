"""Ray's and NumExpr's own log lines are held back by default; `--log-level DEBUG` brings them back (issue 13.6)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpfm_scale import ray_utils

ROOT = Path(__file__).resolve().parents[2]
THIRD_PARTY = (*ray_utils.RAY_LOGGERS, "numexpr")


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging changes process-wide state: logger levels, the module flag and Ray's env variables."""
    levels = {name: logging.getLogger(name).level for name in THIRD_PARTY}
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    for key in ("RAY_LOGGER_LEVEL", "RAY_DATA_LOG_LEVEL"):
        monkeypatch.delenv(key, raising=False)  # recorded, so the test's values are undone
    monkeypatch.setattr(ray_utils, "_verbose", ray_utils._verbose)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    root.handlers[:], root.level = handlers, root_level


def test_print_config_logs_nothing() -> None:
    # embed imports pandas, which imports NumExpr, which logs its thread count at INFO
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "gpfm_scale", "embed", "--print-config"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "model" in done.stdout
    assert done.stderr == ""


@pytest.mark.usefixtures("restore_logging")
def test_ray_and_numexpr_are_quiet_by_default_and_debug_brings_them_back() -> None:
    ray_utils.configure_logging("INFO")
    for name in THIRD_PARTY:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    assert not logging.getLogger("ray.train").isEnabledFor(logging.WARNING)  # PlacementGroupCleaner's warnings
    assert logging.getLogger("ray").isEnabledFor(logging.ERROR)
    assert os.environ["RAY_LOGGER_LEVEL"] == "error"  # Ray's worker processes (Train controller) too
    assert ray_utils.ray_level_name() == "ERROR"  # Ray Train's LoggingConfig (controller and train workers)

    ray_utils.configure_logging("DEBUG")
    for name in THIRD_PARTY:
        assert logging.getLogger(name).isEnabledFor(logging.INFO), name
    assert ray_utils.ray_level_name() == "INFO"
