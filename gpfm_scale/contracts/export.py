"""The exported teacher (`model.safetensors` + `config.json`), its config checked before anything reaches timm.

`gpfm-scale pretrain` writes `OUT/export/` = `model.safetensors` + `config.json` (train/checkpoint.py,
`export_teacher`, with the run's `crops.mean`/`crops.std` as the input contract); `embed` and users rebuild it with
`load_exported` (plain timm). The file is a plain JSON anyone can edit, and its `timm` block is passed to
`timm.create_model(**...)` in every inference actor: unchecked, `"pretrained": true` makes each actor try to
download weights, a hub id (`hf-hub:...`) fetches a config from the network, and an `img_size` other than the
weights' grid silently changes the input size every tile is resized to (timm resamples the position embedding).
So the file is read through a schema (allowed keys only, `pretrained` must be false) and checked against the
safetensors header (the shapes of `pos_embed` and `patch_embed.proj.weight`, read without loading the weights).
Every refusal is a ConfigError naming the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from gpfm_scale.config import StrictModel
from gpfm_scale.contracts.model_input import InputContract
from gpfm_scale.errors import ConfigError

if TYPE_CHECKING:
    import torch

EXPORT_FORMAT = "gpfm-scale teacher backbone"  # the "format" of an export's config.json
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_SHAPED = ("pos_embed", "patch_embed.proj.weight", "cls_token", "reg_token")


class TimmArgs(StrictModel):
    """The `timm.create_model` keyword arguments of an export (`models.vit.timm_create_kwargs` writes them)."""

    model_name: str
    pretrained: Literal[False] = Field(
        False, description="Must be false: the weights are model.safetensors, and nothing is ever downloaded.")
    img_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    num_classes: Literal[0] = 0
    dynamic_img_size: bool = True
    init_values: float = Field(0.0, ge=0)
    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)

    @field_validator("model_name")
    @classmethod
    def _local_architecture(cls, name: str) -> str:
        import timm

        if ":" in name or "/" in name or not timm.is_model(name):
            raise ValueError(f"{name!r} is not a timm architecture of this install (hub ids are refused: nothing "
                             "is downloaded)")
        return name


class ExportConfig(StrictModel):
    """`config.json` of an export: how to rebuild the backbone and what input it takes."""

    format: Literal[EXPORT_FORMAT]
    timm: TimmArgs
    embed_dim: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    img_size: int = Field(gt=0, description="Input side in px: the size every tile is resized to.")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    features: str
    step: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> ExportConfig:
        if self.timm.img_size != self.img_size:
            raise ValueError(f"timm.img_size {self.timm.img_size} differs from img_size {self.img_size}")
        if self.timm.patch_size != self.patch_size:
            raise ValueError(f"timm.patch_size {self.timm.patch_size} differs from patch_size {self.patch_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.timm.embed_dim not in (None, self.embed_dim):
            raise ValueError(f"timm.embed_dim {self.timm.embed_dim} differs from embed_dim {self.embed_dim}")
        if not all(math.isfinite(v) and v > 0 for v in self.std) or not all(map(math.isfinite, self.mean)):
            raise ValueError(f"mean {self.mean} / std {self.std} must be finite, std > 0")
        return self

    @property
    def input_contract(self) -> InputContract:
        return InputContract(self.img_size, self.mean, self.std)

    def create_kwargs(self) -> dict[str, Any]:
        """`timm.create_model` arguments, `pretrained=False` spelled out whatever the file said."""
        return {**self.timm.model_dump(exclude_none=True), "pretrained": False}


def _weight_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors header (the weights stay on disk)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in _SHAPED if k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError) on bad files
        raise ConfigError(f"{path}: not a readable safetensors file ({err})") from None


def _check_weights(cfg: ExportConfig, weights: Path) -> None:
    """The weights' patch size, width and position grid must be the config's (the input contract)."""
    shapes = _weight_shapes(weights)
    if "pos_embed" not in shapes or "patch_embed.proj.weight" not in shapes:
        raise ConfigError(f"{weights}: no pos_embed / patch_embed.proj.weight: not a ViT export")
    dim, _, patch, _ = shapes["patch_embed.proj.weight"]
    if patch != cfg.patch_size or dim != cfg.embed_dim:
        raise ConfigError(f"config.json: patch_size {cfg.patch_size} / embed_dim {cfg.embed_dim} do not match "
                          f"{weights.name} (patch {patch} px, width {dim})")
    n_pos = shapes["pos_embed"][1]
    grid = cfg.img_size // cfg.patch_size
    # the position table holds the grid, plus the class and register tokens unless the arch has `no_embed_class`
    prefix = ("cls_token" in shapes) + (shapes["reg_token"][1] if "reg_token" in shapes else 0)
    if n_pos not in (grid * grid, grid * grid + prefix):
        side = math.isqrt(max(n_pos - prefix, 0))
        raise ConfigError(f"config.json: img_size {cfg.img_size} does not match {weights.name}: its pos_embed has "
                          f"{n_pos} positions (about a {side} x {side} grid of {patch} px = img_size "
                          f"{side * patch}), img_size {cfg.img_size} needs a {grid} x {grid} grid")


def read_export_config(directory: str | Path) -> ExportConfig:
    """The validated config of the export in `directory`; ConfigError naming the key or file otherwise."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise ConfigError(f"{directory}: not an exported teacher (no {name}); expected a directory written by "
                              "`gpfm-scale pretrain` (OUT/export)")
    try:
        raw = json.loads((directory / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{directory / CONFIG_FILE}: not JSON ({err})") from None
    try:
        cfg = ExportConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(map(str, first["loc"])) or "(top level)"
        raise ConfigError(f"{directory / CONFIG_FILE}: {key}: {first['msg']}"
                          f"{f' (and {err.error_count() - 1} more)' if err.error_count() > 1 else ''}") from None
    _check_weights(cfg, directory / WEIGHTS_FILE)
    return cfg


def load_exported(directory: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild an exported teacher with plain timm (what users and `embed` do), its config.json validated first
    (a tampered file must not make timm download or change the input size)."""
    import timm
    from safetensors.torch import load_file

    directory = Path(directory)
    checked = read_export_config(directory)
    config = checked.model_dump(mode="json", exclude_none=True)
    model = timm.create_model(**checked.create_kwargs())
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=device), strict=True)
    return model.eval().to(device), config
