"""Optimizer parameter groups for the student, DINOv2-style: lr/wd multipliers per tensor, fused into few groups.

Rules (per trainable parameter, by name and owning module):
- no weight decay (wd_multiplier 0) on biases, normalisation weights (LayerNorm/GroupNorm/BatchNorm/RMSNorm or a
  module whose name contains "norm") and LayerScale gammas (timm `ls1.gamma`/`ls2.gamma`, BEiT `gamma_1`) only.
  The token/position parameters `pos_embed`, `cls_token`, `mask_token`, `reg_token` ARE decayed, as in DINOv2 and
  so GPFM (dinov2 utils/param_groups.py: wd 0 only for ".bias", "norm", "gamma" names), unlike BEiT/MAE.
- layer-wise lr decay inside every timm-style ViT found in the model (a module with `blocks` and `patch_embed`):
  layer_id 0 for patch_embed / pos_embed / cls / mask / register tokens (also a token kept by a wrapper beside
  its ViT, like `Backbone.mask_token`), i + 1 for `blocks.i`, depth + 1 for the rest (final norm, ViT head);
  lr_multiplier = decay ** (depth + 1 - layer_id). Parameters outside any ViT (DINO/iBOT head, expert
  projection heads) get 1.0.
- patch_embed lr x patch_embed_lr_mult (0.2).
- is_last_layer when the name contains `last_layer_key` ("last_layer"): its lr follows the last-layer schedule
  (0 during the first epoch). Every name containing the key matches, so the expert projection heads' last
  layers (also `last_layer`, as in GPFM, whose param groups freeze them the same way) are frozen in epoch 1
  too; set the key to "dino_head.last_layer" to freeze only the DINO head.
Groups with identical (lr_multiplier, wd_multiplier, is_last_layer) are fused. The trainer calls
`apply_schedule` every step; it sets lr = schedule lr x lr_multiplier and weight_decay = schedule wd x wd_multiplier.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer

from gpfm_scale.train.config import OptimConfig
from gpfm_scale.train.schedules import ScheduleValues

logger = logging.getLogger(__name__)

TOKEN_PARAMS = frozenset({"pos_embed", "cls_token", "mask_token", "reg_token"})
EMBED_PREFIXES = ("patch_embed", *TOKEN_PARAMS)
LAYER_SCALE_MODULES = frozenset({"ls1", "ls2"})
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)


@dataclass(frozen=True)
class ParamRule:
    """The optimisation rule for one named parameter."""

    name: str
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def _named_params_with_owner(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, nn.Parameter]]:
    """(full name, owning module's name, owning module, parameter) for each trainable parameter, once."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{mod_name}.{pname}" if mod_name else pname), mod_name, module, param


def _vit_depths(model: nn.Module) -> dict[str, int]:
    """Name prefix ('' or 'backbone.') -> number of blocks, for each timm-style ViT inside `model`."""
    return {
        (name + "." if name else ""): len(module.blocks)
        for name, module in model.named_modules()
        if hasattr(module, "blocks") and hasattr(module, "patch_embed")
    }


def _layer_id(relative_name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for blocks.i, depth + 1 for anything after the blocks."""
    first = relative_name.split(".")[0]
    if first in EMBED_PREFIXES:
        return 0
    if first == "blocks":
        return int(relative_name.split(".")[1]) + 1
    return depth + 1


def _no_weight_decay(pname: str, mod_name: str, module: nn.Module) -> bool:
    leaf_module = mod_name.rsplit(".", 1)[-1]
    return (
        pname == "bias"
        or pname.startswith("gamma")
        or leaf_module in LAYER_SCALE_MODULES
        or isinstance(module, NORM_TYPES)
        or "norm" in leaf_module
    )


def _vit_of(full: str, mod_name: str, depths: dict[str, int]) -> tuple[str, int, str] | None:
    """(ViT prefix, depth, name relative to the ViT) for a parameter that belongs to a ViT's layer stack.

    A token parameter kept by a wrapper beside its ViT (our `Backbone.mask_token` next to `Backbone.vit`)
    counts as that ViT's layer 0, as DINOv2's own ViT, which holds the mask token, does.
    """
    prefix = max((p for p in depths if full.startswith(p)), key=len, default=None)
    if prefix is not None:
        return prefix, depths[prefix], full[len(prefix) :]
    pname = full.rsplit(".", 1)[-1]
    owner = mod_name + "." if mod_name else ""
    children = [p for p in depths if p.startswith(owner)]
    if pname in TOKEN_PARAMS and len(children) == 1:
        return children[0], depths[children[0]], pname
    return None


def param_rules(model: nn.Module, cfg: OptimConfig) -> list[ParamRule]:
    """One `ParamRule` per trainable parameter, in module order (for inspection and logging)."""
    depths = _vit_depths(model)
    rules = []
    for full, mod_name, module, _ in _named_params_with_owner(model):
        lr_mult = 1.0
        vit = _vit_of(full, mod_name, depths)
        if vit is not None:
            _, depth, relative = vit
            lr_mult = cfg.layerwise_decay ** (depth + 1 - _layer_id(relative, depth))
            if relative.startswith("patch_embed"):
                lr_mult *= cfg.patch_embed_lr_mult
        wd_mult = 0.0 if _no_weight_decay(full.rsplit(".", 1)[-1], mod_name, module) else 1.0
        rules.append(ParamRule(full, lr_mult, wd_mult, cfg.last_layer_key in full))
    return rules


def build_param_groups(student: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Fused optimizer groups: {"params", "lr_multiplier", "wd_multiplier", "is_last_layer"} each.

    Pass the result to the optimizer (lr/weight_decay are set later by `apply_schedule`, before step 0).
    """
    params = {full: p for full, _, _, p in _named_params_with_owner(student)}
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for rule in param_rules(student, cfg):
        key = (rule.lr_multiplier, rule.wd_multiplier, rule.is_last_layer)
        group = groups.setdefault(
            key, {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": key[2]}
        )
        group["params"].append(params[rule.name])
    for g in groups.values():
        logger.info(
            "param group: %d tensors, lr x %.4g, wd x %g, last_layer=%s",
            len(g["params"]),
            g["lr_multiplier"],
            g["wd_multiplier"],
            g["is_last_layer"],
        )
    return list(groups.values())


def apply_schedule(optimizer: Optimizer, values: ScheduleValues) -> None:
    """Set every group's lr and weight_decay for this step from the schedule and the group's multipliers."""
    for group in optimizer.param_groups:
        base_lr = values.last_layer_lr if group["is_last_layer"] else values.lr
        group["lr"] = base_lr * group["lr_multiplier"]
        group["weight_decay"] = values.wd * group["wd_multiplier"]
