"""The expert interface: a frozen pathology model that turns uint8 crops into CLS (and patch) targets.

Why experts take uint8: the training worker (or a remote expert actor) ships the unmasked global crops before
normalisation (4x fewer bytes than float32), and each expert applies the input contract its config names
(`ExpertConfig.preprocessing`):
- `gpfm_original` (the recipe): the crops as they arrive, ImageNet mean/std, for every expert. That is GPFM's code:
  the teacher's 224-px global crops, already ImageNet-normalised, go to UNI, Phikon and CONCH alike.
- `native`: the expert's own input size (bicubic, antialiased, clamped to [0, 1] as a uint8 image would be) and
  mean/std; for CONCH 448 px and OpenAI CLIP statistics. Embedding with an expert always uses this one.

Registry: `EXPERTS` maps a lower_snake name to an `Expert` subclass carrying its `ExpertSpec`; `build_expert`
turns an `ExpertConfig` into a loaded, frozen expert. The registry lives here, beside the interface, as
`SLIDE_READERS` lives in `slides/reader.py`; `gpfm_scale/registry.py` provides the `Registry` helper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gpfm_scale.contracts.model_input import IMAGENET_MEAN, IMAGENET_STD, InputContract
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import ExpertConfig, Preprocessing
from gpfm_scale.models.losses.expert_distill import resample_patch_grid
from gpfm_scale.models.experts.weights import drop_tolerated, load_strict, read_state_dict
from gpfm_scale.registry import Registry

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ExpertSpec:
    """What the rest of the system needs to know about an expert without building it."""

    name: str
    embed_dim: int  # D of the CLS (and patch) targets
    input_size: int  # px, square, the expert's native input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int  # px per patch of its trunk
    has_patch_tokens: bool
    weights_note: str  # where the weights come from and under which licence
    needs_weights: bool = True  # False only for random-init test experts

    @property
    def native_contract(self) -> InputContract:
        """The expert's own input contract (what `native` preprocessing and embedding with the expert use)."""
        return InputContract(self.input_size, self.mean, self.std)

    def input_contract(self, preprocessing: Preprocessing) -> tuple[int | None, tuple[float, ...], tuple[float, ...]]:
        """(size px, mean, std) the crops are brought to before the forward pass; size None: kept as given."""
        if preprocessing == "gpfm_original":
            return None, IMAGENET_MEAN, IMAGENET_STD
        return self.input_size, self.mean, self.std


class Expert(nn.Module):
    """Frozen expert. `forward(crops uint8 [B, 3, H, W]) -> dict(cls [B, D], patch [B, N, D] | None)`.

    Subclasses set `spec`, build their network as `self.model` (the module the weight file loads into) and
    implement `encode(x)` on preprocessed float input. `tolerated_prefixes` names file keys that may be dropped;
    `adapt_state_dict` maps the (kept) file keys to `self.model`'s names.
    """

    spec: ClassVar[ExpertSpec]
    tolerated_prefixes: ClassVar[tuple[str, ...]] = ()
    model: nn.Module

    def __init__(self, preprocessing: Preprocessing = "gpfm_original") -> None:
        super().__init__()
        self.preprocessing = preprocessing

    def freeze(self) -> None:
        """No gradients, eval mode (no dropout / drop-path), for good: `train()` cannot undo it."""
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Expert:
        """Always eval: a parent's `.train()` (the SSL module) must not switch a frozen teacher to training."""
        return super().train(False)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """x [B, 3, S, S] normalised -> dict(cls [B, D], patch [B, N, D] or None)."""
        raise NotImplementedError

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """File key names -> `self.model` key names (identity for timm-layout checkpoints)."""
        return state_dict

    def load_weights(self, path: str | Path) -> None:
        """Load a local weight file strictly (see `weights.py`); raises CheckpointMismatchError."""
        self.load_published_state_dict(read_state_dict(path, self.spec.name))

    def load_published_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Drop the tolerated file keys, map the rest to `self.model`'s names, load strictly."""
        name = self.spec.name
        kept = drop_tolerated(state_dict, self.tolerated_prefixes, name)
        load_strict(self.model, self.adapt_state_dict(kept), name)

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float [B, 3, S, S] on the expert's device: /255, resize, normalise."""
        if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3:
            raise ValueError(f"{self.spec.name}: expects uint8 [B, 3, H, W], got {crops.dtype} {list(crops.shape)}")
        size, mean, std = self.spec.input_contract(self.preprocessing)
        param = self._param()
        x = crops.to(device=param.device, dtype=torch.float32) / 255.0
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean_t) / std_t).to(param.dtype)

    def forward(self, crops: torch.Tensor, grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor | None]:
        """uint8 crops -> targets; with `grid`, patch tokens are resampled to that (student) patch grid."""
        with torch.no_grad():
            out = self.encode(self.preprocess(crops))
            if grid is not None and out["patch"] is not None:
                out["patch"] = resample_patch_grid(out["patch"], grid)
        return out


EXPERTS: Registry[type[Expert]] = Registry("expert")


def build_expert(cfg: ExpertConfig) -> Expert:
    """Build, load and freeze the expert `cfg.name`. Raises ConfigError (unknown name, no weights, bad patch
    weight) before building anything, and CheckpointMismatchError when the weight file does not fit."""
    try:
        cls = EXPERTS.get(cfg.name)
    except KeyError as err:
        raise ConfigError(f"experts: {err.args[0]}") from None
    spec = cls.spec
    if cfg.patch_weight is not None and not spec.has_patch_tokens:
        raise ConfigError(f"experts.{cfg.name}.patch_weight: {cfg.name} has no patch tokens; set it to null")
    if cfg.weights is None and spec.needs_weights:
        raise ConfigError(f"experts.{cfg.name}.weights: required (local file). {spec.weights_note}")
    expert = cls(preprocessing=cfg.preprocessing)
    if cfg.weights is not None:
        expert.load_weights(cfg.weights)
    expert.freeze()
    size, _, _ = spec.input_contract(cfg.preprocessing)
    logger.info(
        "expert %s: dim %d, input %s (%s), patch tokens %s",
        spec.name,
        spec.embed_dim,
        "the global crops as given" if size is None else f"{size} px",
        cfg.preprocessing,
        spec.has_patch_tokens,
    )
    return expert
