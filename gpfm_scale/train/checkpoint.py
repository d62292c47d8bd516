"""Checkpoints for exact resume, and the exported teacher that needs nothing of this package to load.

A checkpoint directory holds DeepSpeed's own files under `ds/` (module incl. the EMA teacher and the loss centres,
optimiser shards, one file per rank under ZeRO) with the step as client state. The teacher is fp32 buffers in the
module's state dict (never cast or partitioned by DeepSpeed), so it is saved and restored bit for bit. Nothing else is needed: data order,
augmentation, masks and drop-path are pure functions of (seed, rank, step) (`train_step` reseeds torch every step),
and schedules are pure functions of the step.

The export is `model.safetensors` (the teacher's timm ViT weights) + `config.json` (the `timm.create_model`
arguments and the input contract), so `timm.create_model(**config["timm"])` + `load_state_dict` rebuilds it, and
`warm_start.safetensors` (the teacher's mask token and DINO/iBOT heads), which a later phase's `init` reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpfm_scale.atomic import save_safetensors_atomic, write_bytes_atomic
from gpfm_scale.contracts.export import CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE
from gpfm_scale.errors import CheckpointMismatchError
from gpfm_scale.models.vit import timm_create_kwargs
from gpfm_scale.train.warm_start import export_warm_start

if TYPE_CHECKING:
    from gpfm_scale.data.config import CropConfig

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


def export_teacher(model: Any, backbone_cfg: Any, directory: str | Path, step: int, is_writer: bool, *,
                   crops: CropConfig) -> None:
    """Write the fp32 teacher backbone as safetensors + config.json on the writer rank (whole on every rank: no
    gather, whatever the ZeRO stage). The input contract's mean/std are the run's `crops.mean`/`crops.std`: what
    the teacher was trained on, so what `embed` must normalise with."""
    if not is_writer:
        return
    backbone = model.teacher["backbone"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(backbone.export_state_dict(), str(directory / WEIGHTS_FILE))
    export_warm_start(model, directory)
    config = {
        "format": EXPORT_FORMAT,
        "timm": timm_create_kwargs(backbone_cfg),
        "embed_dim": backbone.embed_dim,
        "patch_size": backbone_cfg.patch_size,
        "img_size": backbone_cfg.img_size,
        "mean": list(crops.mean),
        "std": list(crops.std),
        "features": "CLS token after the final LayerNorm (forward_features(x)[:, 0])",
        "step": step,
    }
    write_bytes_atomic(str(directory / CONFIG_FILE), (json.dumps(config, indent=2) + "\n").encode())
    log.info("exported teacher (step %d) to %s", step, directory)

