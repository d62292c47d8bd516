"""The models `embed` runs: an exported gpfm-scale teacher, an expert of the registry, or any timm model.

`--model` takes three forms:
- a directory written by `export_teacher` (`model.safetensors` + `config.json`): features = the CLS token after
  the final norm (`forward_features(x)[:, 0]`, as the export's config states), its `img_size`, `mean` and `std`
  (the pretraining run's `crops.mean`/`crops.std`);
  the config is validated first (`contracts/export.py`: allowed keys only, never `pretrained`, grid = the weights');
- `expert:NAME` or `expert:NAME=/path/weights`: `Expert.forward(uint8)["cls"]` with the expert's own input
  contract (UNI/Phikon/CONCH need a weight file: from the spec or `EmbedConfig.weights`);
- `timm:NAME`: `timm.create_model(NAME, pretrained=False, num_classes=0)` (pooled pre-logits features), input
  contract from timm's pretrained config, weights from `EmbedConfig.weights`. Nothing is ever downloaded, and
  without weights the stage refuses unless `allow_random_init`: a random model silently embedding a cohort would
  feed meaningless features into every evaluation downstream.

Preprocessing is split where the bytes are cheapest: read tasks resize each tile to the model's input size and
ship uint8 [3, S, S] (4x fewer bytes than float32); the `Embedder` in the inference actor scales to [0, 1] and
normalises with the model's own mean/std. Tiles are resized whole (no centre crop), as CLAM/TRIDENT feed tiles.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from gpfm_scale.contracts.model_input import InputContract
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import ExpertConfig

log = logging.getLogger(__name__)

SpecKind = Literal["export", "expert", "timm"]


@dataclass(frozen=True)
class ModelInfo:
    """A validated `--model`, described without building it (the driver needs this; actors build the model).

    `name` labels the features (h5 attribute `model`, evaluation tables); `fingerprint` identifies the weights
    exactly, so a rerun into the same output refuses another model instead of mixing features.
    """

    kind: SpecKind
    target: str  # export directory, expert name or timm architecture
    weights: Path | None
    name: str
    fingerprint: str
    dim: int
    contract: InputContract


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _weights_path(given: str | None, cfg: EmbedConfig, spec: str) -> Path | None:
    path = Path(given) if given else cfg.weights
    if path is not None and not path.is_file():
        raise ConfigError(f"--model {spec}: weights file not found: {path}")
    return path


def _describe_export(spec: str) -> ModelInfo:
    from gpfm_scale.contracts.export import WEIGHTS_FILE, read_export_config

    directory = Path(spec)
    if not directory.is_dir():
        raise ConfigError(f"--model {spec}: not an exported teacher (no such directory); expected expert:NAME, "
                          "timm:NAME or a directory written by `gpfm-scale pretrain` (OUT/export)")
    try:
        config = read_export_config(directory)
    except ConfigError as err:
        raise ConfigError(f"--model {spec}: {err}") from None
    contract = config.input_contract
    label = directory.resolve().parent.name if directory.resolve().name == "export" else directory.resolve().name
    return ModelInfo("export", str(directory), directory / WEIGHTS_FILE, f"teacher:{label}@step{config.step}",
                     _sha256(directory / WEIGHTS_FILE), config.embed_dim, contract)


def _describe_expert(spec: str, name: str, given: str | None, cfg: EmbedConfig) -> ModelInfo:
    from gpfm_scale.models.experts import EXPERTS

    try:
        cls = EXPERTS.get(name)
    except KeyError as err:
        raise ConfigError(f"--model {spec}: {err.args[0]}") from None
    weights = _weights_path(given, cfg, spec)
    if weights is None and cls.spec.needs_weights:
        raise ConfigError(f"--model {spec}: expert {name!r} needs a local weight file (expert:{name}=/path or "
                          f"config `weights`). {cls.spec.weights_note}")
    fingerprint = _sha256(weights) if weights else f"{name}-builtin"
    return ModelInfo("expert", name, weights, f"expert:{name}", fingerprint, cls.spec.embed_dim,
                     cls.spec.native_contract)


def _describe_timm(spec: str, name: str, cfg: EmbedConfig) -> ModelInfo:
    import timm

    weights = _weights_path(None, cfg, spec)
    if weights is None and not cfg.allow_random_init:
        raise ConfigError(f"--model {spec}: no weights given (config `weights`: a local file; nothing is "
                          "downloaded). A random-init model would embed the cohort with meaningless features; set "
                          "`allow_random_init: true` only for a deliberate random baseline")
    try:
        with torch.device("meta"):  # shapes and the data config without allocating the weights
            model = timm.create_model(name, pretrained=False, num_classes=0, **cfg.timm_kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"--model {spec}: timm cannot build {name!r}: {err}") from None
    data = timm.data.resolve_model_data_config(model)
    # timm's data config keeps the registered input size even when `img_size` is overridden: a ViT's patch
    # embedding knows the size it was built for
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = int(built[-1] if isinstance(built, (tuple, list)) else built or data["input_size"][-1])
    contract = InputContract(size, tuple(data["mean"]), tuple(data["std"]))
    fingerprint = _sha256(weights) if weights else "random-init"
    label = f"timm:{name}" + ("" if weights else "(random)")
    return ModelInfo("timm", name, weights, label, fingerprint, int(model.num_features), contract)


def describe_model(spec: str, cfg: EmbedConfig) -> ModelInfo:
    """Parse and validate `--model` (ConfigError with the fix on any problem), without building the network."""
    if spec.startswith("expert:"):
        name, _, given = spec.removeprefix("expert:").partition("=")
        return _describe_expert(spec, name, given or None, cfg)
    if spec.startswith("timm:"):
        return _describe_timm(spec, spec.removeprefix("timm:"), cfg)
    return _describe_export(spec)


class Embedder(nn.Module):
    """uint8 tiles [B, 3, S, S] (already at the model's size) -> features [B, D] float32, eval mode, no grad."""

    def __init__(self, net: nn.Module, encode: Callable[[torch.Tensor], torch.Tensor], contract: InputContract,
                 normalise: bool) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self._encode = encode
        self.contract = contract
        self.normalise = normalise
        self.register_buffer("mean", torch.tensor(contract.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(contract.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(f"Embedder expects uint8 [B, 3, S, S], got {tiles.dtype} {list(tiles.shape)}")
        with torch.no_grad():
            x = tiles
            if self.normalise:
                x = (tiles.float() / 255.0 - self.mean) / self.std
            return self._encode(x).float()


def _load_timm_weights(model: nn.Module, weights: Path, name: str) -> None:
    """Strict load; only the classifier keys of the file (the model has num_classes=0) may be dropped."""
    from gpfm_scale.models.experts.weights import drop_tolerated, load_strict, read_state_dict

    classifier = model.pretrained_cfg.get("classifier") or "head"
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    load_strict(model, drop_tolerated(read_state_dict(weights, name), heads, name), name)


def build_embedder(info: ModelInfo, cfg: EmbedConfig) -> Embedder:
    """Build the network described by `info` on CPU (the caller moves it): what each inference actor runs."""
    if info.kind == "export":
        from gpfm_scale.contracts.export import load_exported

        model, _ = load_exported(info.target)
        return Embedder(model, lambda x: model.forward_features(x)[:, 0], info.contract, normalise=True)
    if info.kind == "expert":
        from gpfm_scale.models.experts import build_expert

        expert = build_expert(ExpertConfig(name=info.target, weights=info.weights, preprocessing="native"))
        return Embedder(expert, lambda x: expert(x)["cls"], info.contract, normalise=False)
    import timm

    model = timm.create_model(info.target, pretrained=False, num_classes=0, **cfg.timm_kwargs)
    if info.weights is not None:
        _load_timm_weights(model, info.weights, f"timm:{info.target}")
    else:
        log.warning("timm:%s runs with RANDOM weights (allow_random_init)", info.target)
    return Embedder(model, model, info.contract, normalise=True)


def load_model(spec: str, cfg: EmbedConfig) -> tuple[Embedder, InputContract]:
    """`--model` -> (Embedder on CPU, its input contract): the one call tests and notebooks need."""
    info = describe_model(spec, cfg)
    return build_embedder(info, cfg), info.contract
