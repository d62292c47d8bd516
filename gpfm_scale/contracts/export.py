"""The exported teacher (`model.safetensors` + `config.json`) in timm's own local-dir layout, its config checked
before anything reaches timm.

`gpfm-scale pretrain` writes `OUT/export/` = `model.safetensors` + `config.json` (train/checkpoint.py,
`export_teacher`). The config.json is the one timm's `local-dir:` loader reads (timm/models/_hub.py
`load_model_config_from_path` -> `_parse_model_cfg`), so plain timm rebuilds the teacher and its preprocessing:

    model = timm.create_model("local-dir:OUT/export", pretrained=True)    # weights from model.safetensors
    timm.data.resolve_data_config({}, model=model)  # input_size (3, S, S), the run's crops.mean/crops.std

- `architecture` + `model_args`: the timm entrypoint and the keyword arguments `models.vit.timm_create_kwargs`
  builds the backbone with (img_size, patch_size, dims, LayerScale, dynamic_img_size; `num_classes` 0);
- `num_features`: the feature width D; `pretrained_cfg`: the input contract (`input_size`, `mean`, `std`: the
  run's crops normalisation; tiles are resized whole, so `crop_pct` 1.0, bicubic);
- `format`, `features`, `step`: ours (timm ignores top-level keys it does not know).

`embed` and users' `load_exported` read the same file. It is a plain JSON anyone can edit, and timm acts on it:
a weight source in `pretrained_cfg` (`hf_hub_id`, `url`, `file`) or a hub architecture (`hf-hub:...`) would reach
the network, `model_args` with `pretrained`/`checkpoint_path` would load something else, and an input size other
than the weights' grid silently changes the size every tile is resized to (timm resamples the position
embedding). So the file is read through a schema (allowed keys only, at every level) and checked against the
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
WEIGHTS_FILE = "model.safetensors"  # the name timm's local-dir loader reads
_SHAPED = ("pos_embed", "patch_embed.proj.weight", "cls_token", "reg_token")


class ModelArgs(StrictModel):
    """Keyword arguments of the timm entrypoint (`models.vit.timm_create_kwargs` less name and `pretrained`)."""

    img_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    num_classes: Literal[0] = 0
    dynamic_img_size: bool = True
    init_values: float = Field(0.0, ge=0)
    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)


class TimmPretrainedCfg(StrictModel):
    """The `pretrained_cfg` block: timm's preprocessing metadata only. No weight source keys (`hf_hub_id`, `url`,
    `file`, `state_dict`): timm's local-dir loader sets the source to the directory itself."""

    input_size: tuple[Literal[3], int, int] = Field(description="(C, H, W): every tile is resized to H x W px.")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: Literal[1.0] = Field(1.0, description="Tiles are resized whole (no centre crop), as embed does.")
    crop_mode: Literal["center"] = "center"
    interpolation: Literal["bicubic"] = "bicubic"
    num_classes: Literal[0] = 0
    fixed_input_size: bool = False
    first_conv: Literal["patch_embed.proj"] = "patch_embed.proj"
    classifier: Literal["head"] = "head"


class ExportConfig(StrictModel):
    """`config.json` of an export: how timm rebuilds the backbone and what input it takes."""

    architecture: str
    num_classes: Literal[0] = 0
    num_features: int = Field(gt=0, description="Feature width D of forward_features(x)[:, 0].")
    model_args: ModelArgs
    pretrained_cfg: TimmPretrainedCfg
    format: Literal[EXPORT_FORMAT]
    features: str
    step: int = Field(ge=0)

    @field_validator("architecture")
    @classmethod
    def _local_architecture(cls, name: str) -> str:
        import timm

        if ":" in name or "/" in name or not timm.is_model(name):
            raise ValueError(f"{name!r} is not a timm architecture of this install (hub ids are refused: nothing "
                             "is downloaded)")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> ExportConfig:
        _, height, width = self.pretrained_cfg.input_size
        if height != width or height != self.model_args.img_size:
            raise ValueError(f"pretrained_cfg.input_size {list(self.pretrained_cfg.input_size)} is not the square "
                             f"model_args.img_size {self.model_args.img_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"model_args.img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.model_args.embed_dim not in (None, self.num_features):
            raise ValueError(f"model_args.embed_dim {self.model_args.embed_dim} differs from num_features "
                             f"{self.num_features}")
        mean, std = self.pretrained_cfg.mean, self.pretrained_cfg.std
        if not all(math.isfinite(v) and v > 0 for v in std) or not all(map(math.isfinite, mean)):
            raise ValueError(f"pretrained_cfg.mean {mean} / std {std} must be finite, std > 0")
        return self

    @property
    def img_size(self) -> int:
        return self.model_args.img_size

    @property
    def patch_size(self) -> int:
        return self.model_args.patch_size

    @property
    def embed_dim(self) -> int:
        return self.num_features

    @property
    def input_contract(self) -> InputContract:
        return InputContract(self.img_size, self.pretrained_cfg.mean, self.pretrained_cfg.std)


def export_config(model_args: dict[str, Any], num_features: int, mean: tuple[float, float, float],
                  std: tuple[float, float, float], step: int) -> dict[str, Any]:
    """The config.json of an export, validated: `model_args` = `models.vit.timm_create_kwargs` (its `model_name`
    becomes `architecture`, `pretrained` is dropped: whoever loads chooses)."""
    args = {k: v for k, v in model_args.items() if k not in ("model_name", "pretrained")}
    size = args["img_size"]
    config = ExportConfig.model_validate({
        "architecture": model_args["model_name"],
        "num_classes": 0,
        "num_features": num_features,
        "model_args": args,
        "pretrained_cfg": {"input_size": (3, size, size), "mean": mean, "std": std},
        "format": EXPORT_FORMAT,
        "features": "CLS token after the final LayerNorm (forward_features(x)[:, 0])",
        "step": step,
    })
    return config.model_dump(mode="json", exclude_none=True)


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
        raise ConfigError(f"config.json: model_args.patch_size {cfg.patch_size} / num_features {cfg.embed_dim} do "
                          f"not match {weights.name} (patch {patch} px, width {dim})")
    n_pos = shapes["pos_embed"][1]
    grid = cfg.img_size // cfg.patch_size
    # the position table holds the grid, plus the class and register tokens unless the arch has `no_embed_class`
    prefix = ("cls_token" in shapes) + (shapes["reg_token"][1] if "reg_token" in shapes else 0)
    if n_pos not in (grid * grid, grid * grid + prefix):
        side = math.isqrt(max(n_pos - prefix, 0))
        raise ConfigError(f"config.json: model_args.img_size {cfg.img_size} does not match {weights.name}: its "
                          f"pos_embed has {n_pos} positions (about a {side} x {side} grid of {patch} px = img_size "
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
    if isinstance(raw, dict) and "timm" in raw and "architecture" not in raw:
        raise ConfigError(f"{directory / CONFIG_FILE}: an export of an older gpfm-scale (a `timm` block, not timm's "
                          "local-dir layout); export the teacher again with this version")
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
    """Rebuild an exported teacher with plain timm (what `embed` does), its config.json validated first (a tampered
    file must not make timm download or change the input size). Same model as timm's own
    `create_model("local-dir:" + directory, pretrained=True)`; this path validates first and loads strictly."""
    import timm
    from safetensors.torch import load_file

    directory = Path(directory)
    checked = read_export_config(directory)
    config = checked.model_dump(mode="json", exclude_none=True)
    # `pretrained_cfg` given so `timm.data.resolve_data_config({}, model=model)` reads the export's input contract
    model = timm.create_model(checked.architecture, pretrained=False, pretrained_cfg=config["pretrained_cfg"],
                              **config["model_args"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=device), strict=True)
    return model.eval().to(device), config
