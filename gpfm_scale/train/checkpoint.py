"""Checkpoints for exact resume, and the exported teacher that needs nothing of this package to load.

A checkpoint directory holds DeepSpeed's own files under `ds/` (module incl. the EMA teacher and the loss centres,
optimiser shards, one file per rank under ZeRO) with the step as client state. The teacher is fp32 buffers in the
module's state dict (never cast or partitioned by DeepSpeed), so it is saved and restored bit for bit. Nothing else is needed: data order,
augmentation, masks and drop-path are pure functions of (seed, rank, step) (the worker reseeds torch every step),
and schedules are pure functions of the step.

The export is `model.safetensors` (the teacher's timm ViT weights) + `config.json` (the `timm.create_model`
arguments and the input contract), so `timm.create_model(**config["timm"])` + `load_state_dict` rebuilds it, and
`warm_start.safetensors` (the teacher's mask token and DINO/iBOT heads), which a later phase's `init` reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gpfm_scale import storage
from gpfm_scale.atomic import save_safetensors_atomic, write_bytes_atomic
from gpfm_scale.errors import CheckpointMismatchError
from gpfm_scale.models.vit import timm_create_kwargs
from gpfm_scale.train.warm_start import EXPORT_FORMAT, export_warm_start

log = logging.getLogger(__name__)

DS_DIR = "ds"
TAG = "state"


def save_training_state(engine: Any, directory: str | Path, step: int) -> None:
    """Every rank calls this (DeepSpeed's save is collective); `step` is the next step to run."""
    engine.save_checkpoint(str(Path(directory) / DS_DIR), tag=TAG, client_state={"step": step})


def load_training_state(engine: Any, directory: str | Path) -> int:
    """Restore engine, optimiser, teacher and loss centres; returns the step to continue from."""
    directory = Path(directory)
    try:
        path, client = engine.load_checkpoint(str(directory / DS_DIR), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    except (RuntimeError, FileNotFoundError, KeyError) as err:
        raise CheckpointMismatchError(f"{directory}: cannot restore the DeepSpeed state ({err}); "
                                      "was it written with another model or world size?") from err
    if path is None or "step" not in (client or {}):
        raise CheckpointMismatchError(f"{directory}: no DeepSpeed checkpoint under {DS_DIR}/{TAG}")
    return int(client["step"])


def export_teacher(model: Any, backbone_cfg: Any, directory: str | Path, step: int, is_writer: bool) -> None:
    """Write the fp32 teacher backbone as safetensors + config.json on the writer rank (whole on every rank: no
    gather, whatever the ZeRO stage). `directory`: local, or a bucket URL (written locally, each file uploaded
    whole, config.json last: `storage.staged_dir`)."""
    if not is_writer:
        return
    with storage.staged_dir(str(directory), last=("config.json",)) as local:
        _write_export(model, backbone_cfg, Path(local), step)
    log.info("exported teacher (step %d) to %s", step, directory)


def _write_export(model: Any, backbone_cfg: Any, directory: Path, step: int) -> None:
    backbone = model.teacher["backbone"]
    save_safetensors_atomic(backbone.export_state_dict(), str(directory / "model.safetensors"))
    export_warm_start(model, directory)
    config = {
        "format": EXPORT_FORMAT,
        "timm": timm_create_kwargs(backbone_cfg),
        "embed_dim": backbone.embed_dim,
        "patch_size": backbone_cfg.patch_size,
        "img_size": backbone_cfg.img_size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "features": "CLS token after the final LayerNorm (forward_features(x)[:, 0])",
        "step": step,
    }
    write_bytes_atomic(str(directory / "config.json"), (json.dumps(config, indent=2) + "\n").encode())


def load_exported(directory: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild an exported teacher with plain timm (what users and `embed` do), its config.json validated first
    (`contracts.export`: a tampered file must not make timm download or change the input size)."""
    import timm

    from gpfm_scale.contracts.export import read_export_config

    directory = Path(directory)
    checked = read_export_config(directory)
    config = checked.model_dump(mode="json", exclude_none=True)
    model = timm.create_model(**checked.create_kwargs())
    model.load_state_dict(load_file(str(directory / "model.safetensors"), device=device), strict=True)
    return model.eval().to(device), config
