"""Every package gpfm_scale imports is declared in pyproject.toml (issue 13.4/13.5), every declared package is used,
and the ones that come from an extra are imported only where the feature runs, so the core install imports
everything it ships.

Imports are read with `ast` from every module, top-level and inside functions; a module is mapped to the
distributions that provide it by `importlib.metadata.packages_distributions()` (the test venv holds `.[all,test]`).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "gpfm_scale"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _groups() -> dict[str, set[str]]:
    """{"core": {distribution names}, extra: {...}} from pyproject.toml, names normalised (PEP 503)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {g: {_norm(Requirement(r).name) for r in reqs} for g, reqs in groups.items()}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


@functools.cache
def _imports() -> list[tuple[str, str, bool]]:
    """(top-level module, "file:line", lazy) for each absolute import outside the standard library and the package.

    lazy: inside a function, or in a `try` whose handlers catch ImportError (the module may then be absent).
    """
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        parents = _parents(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            lazy, up = False, parents.get(node)
            while up is not None and not lazy:
                lazy = isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)) or (isinstance(up, ast.Try) and any(
                    h.type is not None and "ImportError" in ast.unparse(h.type) for h in up.handlers))
                up = parents.get(up)
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "gpfm_scale":
                    found.append((top, f"{path.relative_to(REPO)}:{node.lineno}", lazy))
    return found


def _required() -> set[str]:
    """Top-level modules named by `require("module", ...)` calls (gpfm_scale/extras.py imports them by name)."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "require"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                found.add(str(node.args[0].value).split(".")[0])
    return found


USED_WITHOUT_AN_IMPORT = {
    "openslide-bin": "the OpenSlide C library that openslide-python loads",
    "imagecodecs": "tifffile's JPEG/LZW codecs for TIFF tiles",
    "s3fs": "fsspec's s3:// implementation, loaded by fsspec from the URL's protocol",
    "gcsfs": "fsspec's gs:// implementation, loaded by fsspec from the URL's protocol",
}
"""Declared packages that gpfm_scale never imports by name, with the reason each one is still needed."""


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _providers(module: str) -> set[str]:
    return {_norm(d) for d in _distributions().get(module, [])}


def test_every_imported_package_is_declared_in_core_or_an_extra():
    groups = _groups()
    declared = set().union(*(names for g, names in groups.items() if g != "test"))
    undeclared = sorted({f"{module} ({where}; provided by {sorted(_providers(module)) or 'nothing installed'})"
                         for module, where, _ in _imports() if not _providers(module) & declared})
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


def test_every_declared_package_is_used():
    """A dependency nothing imports is install time and size for nothing (`webdataset` was one: issue 13.4)."""
    used = {d for module, _, _ in _imports() for d in _providers(module)}
    used |= {d for module in _required() for d in _providers(module)}
    groups = _groups()
    declared = set().union(*(names for g, names in groups.items() if g not in ("test", "all")))
    unused = sorted(declared - used - set(USED_WITHOUT_AN_IMPORT) - {"gpfm-scale"})
    assert not unused, "declared in pyproject.toml but imported nowhere in gpfm_scale: " + ", ".join(unused)
    assert not set(USED_WITHOUT_AN_IMPORT) & used, "listed as used without an import, but imported"


def test_packages_from_extras_are_imported_only_where_the_feature_runs():
    """A module-level import of an extra's package would make the core install fail at import."""
    core = _groups()["core"]
    eager = sorted({f"{module} at {where}" for module, where, lazy in _imports()
                    if not lazy and not _providers(module) & core})
    assert not eager, "extra packages imported at module level (import them in the function that needs them, " \
                      "through gpfm_scale.extras.require): " + "; ".join(eager)


def test_the_all_extra_holds_every_other_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"]) - {"all", "test"}
    (all_req,) = (Requirement(r) for r in project["optional-dependencies"]["all"])
    assert _norm(all_req.name) == "gpfm-scale" and all_req.extras == extras
    from gpfm_scale.extras import EXTRAS

    assert set(EXTRAS) == extras


def test_the_lock_file_satisfies_every_requirement_of_pyproject():
    """pylock.toml (`make lock`) pins a version of each requirement of the core and every extra, inside its range:
    a requirement added or tightened in pyproject.toml without regenerating the lock fails here."""
    lock = tomllib.loads((REPO / "pylock.toml").read_text())
    locked = {_norm(p["name"]): p.get("version") for p in lock["packages"]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for g, rs in project["optional-dependencies"].items() if g != "all" for r in rs]
    stale = sorted({f"{r} (locked: {locked.get(_norm(r.name), 'absent')})" for r in reqs
                    if _norm(r.name) not in locked or not r.specifier.contains(locked[_norm(r.name)], prereleases=True)})
    assert not stale, "pylock.toml is stale, run `make lock`: " + "; ".join(stale)
    assert "gpfm-scale" not in locked  # pip cannot hash a directory: the project is installed after, --no-deps
