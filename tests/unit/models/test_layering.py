"""models/ is pure PyTorch + timm: no module in it imports the training package (or ray / deepspeed)."""

from __future__ import annotations

import ast
from pathlib import Path

import gpfm_scale.models

FORBIDDEN = ("gpfm_scale.train", "ray", "deepspeed")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_models_import_nothing_from_train_ray_or_deepspeed() -> None:
    root = Path(gpfm_scale.models.__file__).parent
    bad = {str(path.relative_to(root)): sorted(n for n in _imports(path) if n.split(".")[0] in FORBIDDEN
                                               or n.startswith(FORBIDDEN[0]))
           for path in root.rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}
