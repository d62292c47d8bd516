"""The package's layering, as declared in pyproject.toml's `[tool.importlinter]`, holds for the code as it is.

import-linter builds the import graph of `gpfm_scale` (function-level and TYPE_CHECKING imports included) and checks
each contract: the layers (entry points > stages > shared parts > contracts > base; the stages independent), no
import cycle among sibling modules, and no Ray or DeepSpeed below the stages.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(config: Path) -> subprocess.CompletedProcess:
    """import-linter in its own process: in this one it disables the loggers that already exist (`gpfm_scale.*`),
    which breaks every later test that reads logs through caplog."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_import_contract_in_pyproject_is_kept() -> None:
    done = _lint_imports(ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_checker_sees_a_broken_layer(tmp_path: Path) -> None:
    """The same checker, on a copy of the contracts that inverts two layers, reports the break (it can fail)."""
    text = (ROOT / "pyproject.toml").read_text()
    start = text.index("[tool.importlinter]")
    inverted = text[start:].replace('"gpfm_scale.cli",\n', "").replace(
        '"gpfm_scale.errors",\n', '"gpfm_scale.errors",\n  "gpfm_scale.cli",\n')
    (tmp_path / "contracts.toml").write_text(inverted)
    done = _lint_imports(tmp_path / "contracts.toml")
    assert done.returncode == 1 and "gpfm_scale.cli is not allowed to import gpfm_scale.errors" in done.stdout, (
        done.stdout[-4000:])
