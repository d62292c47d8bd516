"""The package's layering, as declared in pyproject.toml's `[tool.importlinter]`, holds for the code as it is.

import-linter builds the import graph of `gpfm_scale` (function-level and TYPE_CHECKING imports included) and checks
each contract: the layers (entry points > stages > shared parts > contracts > base; the stages independent), no
import cycle among sibling modules, and no Ray or DeepSpeed below the stages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_contract_in_pyproject_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0, (
        "an import breaks the layering: run `.venv/bin/lint-imports` for the chain")


def test_the_checker_sees_a_broken_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checker, on a copy of the contracts that inverts two layers, reports the break (it can fail)."""
    text = (ROOT / "pyproject.toml").read_text()
    start = text.index("[tool.importlinter]")
    inverted = text[start:].replace('"gpfm_scale.cli",\n', "").replace(
        '"gpfm_scale.errors",\n', '"gpfm_scale.errors",\n  "gpfm_scale.cli",\n')
    (tmp_path / "contracts.toml").write_text(inverted)
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(tmp_path / "contracts.toml"), no_cache=True) == 1
