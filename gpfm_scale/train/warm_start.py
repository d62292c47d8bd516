"""Warm start: GPFM's second phase begins from the first one's weights (REFERENCE.md, "Optimisation").

GPFM distils into a student loaded from a 250k-iteration DINOv2-only run (its ssl_meta_arch.py loads the backbone,
heads start fresh) and, as in DINOv2, the teacher starts as a copy of the student. `init` does that here: before
step 0 the teacher's backbone (and with `init.heads` its DINO/iBOT heads) is loaded STRICTLY from `init.weights`
and copied into the student, so both start bitwise equal to the file. The expert heads always start fresh (phase
1 has none), as do the optimiser and the schedules. A resumed run loads its checkpoint and never the init.

Sources (`init.format`, `auto` tells them apart):
- `gpfm_export`: a `gpfm-scale pretrain` export directory: `model.safetensors` (the teacher's timm ViT) +
  `config.json`, and `warm_start.safetensors` (mask token and teacher heads, written beside them by the export);
- `dinov2`: a DINOv2 checkpoint file (hub backbone, or a training checkpoint with `teacher`/`model` inside);
- `timm`: a timm `VisionTransformer` state dict file (no mask token: it keeps its init, DINOv2's zeros).
Files: `.safetensors`, or `.pth`/`.bin`/`.pt` through `torch.load(weights_only=True)`. Key maps: `models/init_keys.py`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from gpfm_scale.atomic import save_safetensors_atomic
from gpfm_scale.config import StrictModel
from gpfm_scale.contracts.export import CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE
from gpfm_scale.errors import CheckpointMismatchError, ConfigError
from gpfm_scale.models.experts.weights import load_strict, load_weight_file, name_list, strict_problems
from gpfm_scale.models.init_keys import HEAD_PARTS, dinov2_to_ours, is_dinov2_layout, resample_pos_embed, timm_to_ours

if TYPE_CHECKING:
    from gpfm_scale.models.meta_arch import SSLMetaArch

logger = logging.getLogger(__name__)

InitFormat = Literal["auto", "gpfm_export", "dinov2", "timm"]
WARM_START_FILE = "warm_start.safetensors"
_WRAPPERS = ("teacher", "model", "state_dict")  # DINOv2 eval / training checkpoints, generic trainers


class InitConfig(StrictModel):
    """Where the student and teacher start from; null `weights`: random init from `run.seed` (phase 1)."""

    weights: Path | None = Field(
        None, description="phase-1 weights: a `gpfm-scale pretrain` export dir, or a local DINOv2 / timm checkpoint "
        "file (.safetensors, .pth, .bin); loaded strictly into student and teacher at step 0, never at resume")
    format: InitFormat = Field("auto", description="auto: a directory is an export, a file with DINOv2's mask "
                               "token / prefixes / chunked blocks is dinov2, else timm")
    heads: bool = Field(False, description="also load the DINO/iBOT heads (GPFM: false, they start fresh)")


def _read(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from `teacher` / `model` / `state_dict` and `module.`."""
    obj = load_weight_file(path, source)
    while isinstance(obj, dict) and (wrapper := next((w for w in _WRAPPERS if isinstance(obj.get(w), dict)), None)):
        obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointMismatchError(f"{source}: {path} holds no state dict (got {type(obj).__name__})")
    state = {str(k): v for k, v in obj.items()}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointMismatchError(f"{source}: {path} has non-tensor entries: {name_list(not_tensors)}")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("teacher.") for k in state):  # a whole DINOv2 SSL model: its teacher is phase 1's result
        state = {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
    return state


def resolve_format(cfg: InitConfig) -> InitFormat:
    """The source's format (`auto` resolved from the path); ConfigError when the path is absent or does not fit."""
    path = cfg.weights
    if path is None:
        raise ConfigError("init.weights: no warm-start source set")
    if path.is_dir():
        if cfg.format not in ("auto", "gpfm_export"):
            raise ConfigError(f"init.weights: {path} is a directory (an export) but init.format is {cfg.format}")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (path / name).is_file():
                raise ConfigError(f"init.weights: {path} is not a `gpfm-scale pretrain` export (no {name})")
        return "gpfm_export"
    if not path.is_file():
        raise ConfigError(f"init.weights: not found: {path} (a phase-1 export dir or a checkpoint file)")
    if cfg.format == "gpfm_export":
        raise ConfigError(f"init.weights: init.format gpfm_export wants an export directory, got the file {path}")
    return cfg.format


def _read_export(directory: Path, source: str) -> dict[str, torch.Tensor]:
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise CheckpointMismatchError(f"{source}: {CONFIG_FILE} format is {config.get('format')!r}, not an export")
    state = timm_to_ours(_read(directory / WEIGHTS_FILE, source))
    extras = directory / WARM_START_FILE
    if extras.is_file():
        state.update(_read(extras, source))
    return state


def read_init_state(cfg: InitConfig) -> tuple[dict[str, torch.Tensor], InitFormat]:
    """The source's tensors in our teacher's names (`models/init_keys.py`) and its resolved format."""
    fmt = resolve_format(cfg)
    path = Path(cfg.weights or "")
    source = f"init.weights {path}"
    if fmt == "gpfm_export":
        return _read_export(path, source), fmt
    state = _read(path, source)
    if fmt == "auto":
        fmt = "dinov2" if is_dinov2_layout(list(state)) else "timm"
    return (dinov2_to_ours(state) if fmt == "dinov2" else timm_to_ours(state)), fmt


def _part(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}


def apply_init(model: SSLMetaArch, cfg: InitConfig) -> None:
    """Load the source strictly into the teacher's backbone (+ heads) and copy them into the student.

    Raises CheckpointMismatchError naming missing, unexpected and wrongly shaped keys (checked for every part
    before anything is copied, so a failed init leaves the model as built)."""
    state, fmt = read_init_state(cfg)
    source = f"init.weights {cfg.weights} ({fmt})"
    parts = ["backbone", *[h for h in HEAD_PARTS if h in model.teacher and cfg.heads]]
    other = sorted(k for k in state if k.split(".", 1)[0] not in ("backbone", *HEAD_PARTS))
    if other:
        raise CheckpointMismatchError(f"{source}: keys of no backbone or head: {name_list(other)}")
    skipped = sorted(k for k in state if k.split(".", 1)[0] not in parts)
    if skipped:
        logger.info("%s: %d head tensors not loaded (init.heads false or no such head): %s", source, len(skipped),
                    name_list(skipped))
    backbone = model.teacher["backbone"]
    if fmt != "gpfm_export":  # published models are made for other sizes (DINOv2's hub: 518 px); an export is ours
        resample_pos_embed(state, backbone.vit.pos_embed, backbone.num_prefix_tokens, source)
    loads = {part: _part(state, part) for part in parts}
    if "mask_token" not in loads["backbone"] and fmt in ("timm", "gpfm_export"):
        logger.warning("%s: no mask token in the source; it keeps its init (zeros, as DINOv2's)", source)
        loads["backbone"]["mask_token"] = backbone.mask_token.detach().clone()
    _check_all(model, loads, source)
    for part, part_state in loads.items():
        load_strict(model.teacher[part], part_state, f"{source} -> teacher.{part}")
        model.student[part].load_state_dict(model.teacher[part].state_dict(), strict=True)
    logger.info("warm start from %s: teacher and student %s", source, " + ".join(parts))


def _check_all(model: SSLMetaArch, loads: dict[str, dict[str, torch.Tensor]], source: str) -> None:
    """Every part's keys and shapes, reported together, before any part is loaded."""
    problems = [f"teacher.{part}: {p}" for part, part_state in loads.items()
                for p in strict_problems(model.teacher[part].state_dict(), part_state)]
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the model; " + "; ".join(problems))


def init_unless_resuming(model: SSLMetaArch, cfg: InitConfig, resuming: bool) -> None:
    """The hook the trainers call after building the model: a resumed run restores its checkpoint instead."""
    if cfg.weights is None:
        return
    if resuming:
        logger.info("resuming: init.weights %s not loaded (the checkpoint holds the weights)", cfg.weights)
        return
    apply_init(model, cfg)


def export_warm_start(model: SSLMetaArch, directory: Path) -> None:
    """Write what an export's `model.safetensors` lacks for a warm start: the teacher's mask token and heads."""
    state = {"backbone.mask_token": model.teacher["backbone"].mask_token}
    for part in HEAD_PARTS:
        if part in model.teacher:
            state.update({f"{part}.{k}": v for k, v in model.teacher[part].state_dict().items()})
    save_safetensors_atomic({k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()},
                            str(directory / WARM_START_FILE))
