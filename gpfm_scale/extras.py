"""Optional dependencies: one clear error, naming the extra to install, when a feature needs one that is missing.

The core install (`pip install gpfm-scale`) tiles, embeds and evaluates on CPU. The extras in pyproject.toml add
what only some runs need. Code that needs an extra calls `require` where the feature is used, never at module
import, so everything else works without it, and a user who asks for the feature reads which extra to install
(exit 2 from the CLI) instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gpfm_scale.errors import MissingExtraError

EXTRAS = {
    "gpu": "cuCIM slide decode and the DALI loader",
    "train": "DeepSpeed pretraining",
    "survival": "survival tasks (c-index, Kaplan-Meier)",
    "cloud": "s3:// and gs:// buckets",
}
"""The optional-dependency groups of pyproject.toml (besides `all` and `test`), with what each one brings."""


def install_hint(extra: str) -> str:
    """The command that installs `extra`: "pip install 'gpfm-scale[train]'"."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    return f"pip install 'gpfm-scale[{extra}]'"


def missing_extra(module: str, extra: str, feature: str, exc: ImportError) -> MissingExtraError:
    """The error for `feature` when importing `module` raised `exc`: not installed, or installed but broken."""
    absent = isinstance(exc, ModuleNotFoundError) and exc.name is not None and (
        module == exc.name or module.startswith(exc.name + "."))
    detail = "is not installed" if absent else f"does not import ({' '.join(str(exc).split())})"
    return MissingExtraError(f"{feature} needs {module.split('.')[0]}, which {detail}; "
                             f"install the '{extra}' extra: {install_hint(extra)}")


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module` (dotted name) for `feature`, or raise MissingExtraError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(module, extra, feature, exc) from exc


__all__ = ["EXTRAS", "install_hint", "missing_extra", "require"]
