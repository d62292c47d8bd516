"""Reading expert weight files and loading them strictly.

Why strict: a renamed key loaded with `strict=False` silently stays random (GPFM loads CONCH that way). Here every
key of the model must be in the file with the same shape, and a file key the model does not have is an error
unless it starts with one of the expert's explicitly tolerated prefixes (a text tower, a pooler), written in the
file's own key names; those are dropped, named and logged (`drop_tolerated`) before the key mapping runs.

Files: `.safetensors` via safetensors; anything else via `torch.load(weights_only=True)` (no arbitrary pickle).
A `{"state_dict": {...}}` wrapper and a DistributedDataParallel `module.` prefix are unwrapped, as CONCH's own
reader does (mahmoodlab/CONCH conch/open_clip_custom/factory.py, `read_state_dict`).
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from gpfm_scale.errors import CheckpointMismatchError

logger = logging.getLogger(__name__)

_SHOWN = 8  # keys named per category in an error message


def read_state_dict(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, on CPU. Raises CheckpointMismatchError when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"{name}: weights file not found: {path} (set the expert's `weights` path)")
    return _unwrap(load_weight_file(path, name), path, name)


def load_weight_file(path: Path, name: str) -> object:
    """What a .safetensors (tensors) or .pth/.bin/.pt file (torch.load, weights_only: no code runs) holds, on CPU;
    CheckpointMismatchError naming `name` when it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, safetensors.SafetensorError) as err:
        raise CheckpointMismatchError(f"{name}: cannot read weights file {path}: {err}") from err


def _unwrap(obj: object, path: Path, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointMismatchError(f"{name}: {path} holds no state dict (got {type(obj).__name__})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointMismatchError(f"{name}: {path} has non-tensor entries: {name_list(not_tensors)}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def name_list(keys: list[str]) -> str:
    """The first few keys, comma-separated, with how many more: error messages stay one readable line."""
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _tolerated_prefix(key: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if key.startswith(p)), None)


def drop_tolerated(
    state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], name: str
) -> dict[str, torch.Tensor]:
    """Remove the keys an expert explicitly does not use (file names, e.g. CONCH's `text.`), logging them."""
    kept = {k: v for k, v in state_dict.items() if not _tolerated_prefix(k, prefixes)}
    dropped = sorted(k for k in state_dict if k not in kept)
    if dropped:
        groups = Counter(_tolerated_prefix(k, prefixes) for k in dropped)
        summary = ", ".join(f"{p}* ({n})" for p, n in sorted(groups.items()))
        logger.info("%s: dropped %d tolerated keys the model does not use: %s", name, len(dropped), summary)
        logger.debug("%s: dropped keys: %s", name, ", ".join(dropped))
    return kept


def strict_problems(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `state_dict` from loading strictly where `expected` is: missing, unexpected, wrongly shaped
    keys, one entry per category with the first few names (empty when it fits)."""
    unexpected = sorted(k for k in state_dict if k not in expected)
    missing = sorted(k for k in expected if k not in state_dict)
    wrong_shape = [
        f"{k} (file {list(v.shape)}, model {list(expected[k].shape)})"
        for k, v in sorted(state_dict.items())
        if k in expected and v.shape != expected[k].shape
    ]
    return [
        f"{label} {len(keys)}: {name_list(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """Load `state_dict` into `module` with every key and shape matching.

    Raises CheckpointMismatchError naming the missing, unexpected and wrongly shaped keys (all of them checked
    before anything is copied, so a failed load leaves the module untouched).
    """
    expected = module.state_dict()
    problems = strict_problems(expected, state_dict)
    if problems:
        raise CheckpointMismatchError(f"{name}: weights do not match the model; " + "; ".join(problems))
    on_meta = any(t.is_meta for t in expected.values())
    module.load_state_dict(dict(state_dict), strict=True, assign=on_meta)
    logger.info("%s: loaded %d tensors", name, len(expected))
