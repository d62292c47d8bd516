"""Key maps from published ViT checkpoints to the names of our teacher/student modules (for the warm start).

Target names are those of `SSLMetaArch.teacher` (= the student's teacher-shaped part): `backbone.vit.*` (the timm
`VisionTransformer`: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,
norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*`, `norm.*`), `backbone.mask_token` [1, 1, D], and the heads `dino_head.*`
(`mlp.{0,2,4}.*`, `last_layer.parametrizations.weight.original0/1`) and, when not shared, `ibot_head.*`.

DINOv2 (facebookresearch/dinov2 `DinoVisionTransformer`, and GPFM's copy of it) names its ViT-L/14 the way timm
does block by block; what differs, and is mapped here:
- `mask_token` is [1, D] and sits on the backbone; ours is [1, 1, D] beside the timm model.
- FSDP training runs chunk the blocks (`block_chunks`): `blocks.{chunk}.{i}.*`, with `i` the global block index
  (each chunk is padded with Identity modules), so `blocks.{c}.{i}.` -> `blocks.{i}.`.
- Training checkpoints hold the SSL model: `backbone.*`, `dino_head.*`, `ibot_head.*`; hub files the bare backbone.
- Its `DINOHead` uses the old `torch.nn.utils.weight_norm`: `last_layer.weight_g` / `weight_v`; ours the
  parametrization: `last_layer.parametrizations.weight.original0` / `original1` (same tensors, same shapes).
- Hub models are made for 518 px: `pos_embed` [1, 1 + 37 x 37, D]. `resample_pos_embed` brings it to our grid with
  timm's `resample_abs_pos_embed` (bicubic), as timm's own DINOv2 loader does; it is logged, never silent.
A timm ViT state dict uses our names already (`backbone.vit.` + key) and has no mask token.
Anything else keeps its name under its part and is then reported by the strict load as unexpected.
"""

from __future__ import annotations

import logging
import math
import re

import torch
from timm.layers import resample_abs_pos_embed

logger = logging.getLogger(__name__)

HEAD_PARTS = ("dino_head", "ibot_head")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_BACKBONE_ROOTS = ("cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed.", "blocks.", "norm.")
_WEIGHT_NORM = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
                "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}


def is_dinov2_layout(keys: list[str]) -> bool:
    """True when the keys show DINOv2's own layout (a mask token, `backbone.`/head prefixes or chunked blocks)."""
    return any(k in ("mask_token", "backbone.mask_token") or k.startswith(("backbone.", *[h + "." for h in HEAD_PARTS]))
               or _CHUNKED_BLOCK.match(k) for k in keys)


def _backbone_key(key: str) -> str:
    """A DINOv2/timm backbone key -> our name under the teacher (`backbone.vit.*` or `backbone.mask_token`)."""
    if key == "mask_token":
        return "backbone.mask_token"
    return "backbone.vit." + _CHUNKED_BLOCK.sub(r"blocks.\1.", key)


def dinov2_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DINOv2 backbone (hub) or SSL-model (training checkpoint) state dict in our teacher's names.

    Keys that belong to neither a backbone nor a head are kept as they are: the strict load names them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in HEAD_PARTS:
            out[f"{part}.{_WEIGHT_NORM.get(rest, rest)}"] = value
        elif part == "backbone" or key.startswith(_BACKBONE_ROOTS):
            inner = rest if part == "backbone" else key
            out[_backbone_key(inner)] = value.reshape(1, 1, -1) if inner == "mask_token" else value
        else:
            out[key] = value
    return out


def timm_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `VisionTransformer` state dict (our export's `model.safetensors`) in our teacher's names."""
    return {"backbone.vit." + k: v for k, v in state.items()}


def resample_pos_embed(state: dict[str, torch.Tensor], target: torch.Tensor, num_prefix: int, source: str) -> None:
    """Resample `backbone.vit.pos_embed` in place to `target`'s square grid when only the grid differs (logged)."""
    key = "backbone.vit.pos_embed"
    given = state.get(key)
    if given is None or given.shape == target.shape or given.ndim != 3 or given.shape[-1] != target.shape[-1]:
        return
    old_side, new_side = math.isqrt(given.shape[1] - num_prefix), math.isqrt(target.shape[1] - num_prefix)
    if old_side**2 != given.shape[1] - num_prefix or new_side**2 != target.shape[1] - num_prefix:
        return  # not two square grids: left for the strict load to report as a shape mismatch
    state[key] = resample_abs_pos_embed(given, new_size=[new_side, new_side], old_size=[old_side, old_side],
                                        num_prefix_tokens=num_prefix, verbose=False)
    logger.warning("%s: position embedding resampled from a %dx%d to a %dx%d patch grid (bicubic)", source,
                   old_side, old_side, new_side, new_side)
