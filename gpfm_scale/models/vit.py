"""Student/teacher ViT backbone: a timm `VisionTransformer` plus the iBOT mask token.

Why a wrapper and not a fork: the timm model keeps its module names (`patch_embed`, `cls_token`, `pos_embed`,
`blocks.{i}`, `norm`), so `Backbone.export_state_dict()` loads into a plain
`timm.create_model(**timm_create_kwargs(cfg))` with `strict=True` and no pickle or project code. The only extra
parameter, `mask_token` [1, 1, D], lives beside it (`Backbone.mask_token`) and is not exported.

Forward order, as DINOv2 does it: patch embedding -> masked patches replaced by `mask_token` -> CLS token and
position embedding -> blocks -> final LayerNorm. Replacing *before* the position embedding is added means a
masked token still knows where it is; the student then predicts the teacher's token there (iBOT).

Position embeddings: built with `dynamic_img_size=True`, timm resamples the 16 x 16 grid (224 px / 14) to the
input's grid on every call with `resample_abs_pos_embed` (bicubic, antialias=True): 98-px local crops give
7 x 7 = 49 patch tokens. DINOv2 uses bicubic without antialias (and a 0.1 offset); downsampling 16 -> 7 the two
differ slightly. Training and export use the same timm function, so what is trained is what is served.
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.layers import DropPath
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import BackboneConfig

logger = logging.getLogger(__name__)


def timm_create_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """The `timm.create_model` arguments that rebuild the exported backbone (without drop-path: inference)."""
    kwargs: dict[str, Any] = {
        "model_name": cfg.arch,
        "pretrained": False,
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_classes": 0,
        "dynamic_img_size": True,
        # 0.0, not None, disables LayerScale: timm drops None keyword arguments, so the arch's own default
        # (1e-5 for the dinov2 names) would come back.
        "init_values": cfg.layerscale_init or 0.0,
    }
    for key in ("embed_dim", "depth", "num_heads"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    return kwargs


def create_vit(model_name: str, **kwargs: Any) -> VisionTransformer:
    """`timm.create_model(model_name, **kwargs)`, refusing archs that are not a plain timm `VisionTransformer`."""
    try:
        model = timm.create_model(model_name, **kwargs)
    except (RuntimeError, TypeError) as err:  # unknown name / an arch that takes no ViT arguments
        raise ConfigError(f"{model_name}: cannot build it as a timm VisionTransformer: {err}") from err
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{model_name}: not a timm VisionTransformer ({type(model).__name__})")
    return model


def _set_drop_path(vit: VisionTransformer, rate: float, uniform: bool) -> None:
    """Uniform stochastic depth (DINOv2 ViT-L: every block at `rate`); timm's own rule ramps 0 -> rate."""
    blocks = list(vit.blocks)
    for i, block in enumerate(blocks):
        block_rate = rate if uniform else rate * i / max(len(blocks) - 1, 1)
        block.drop_path1 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(block_rate) if block_rate > 0 else nn.Identity()


class Backbone(nn.Module):
    """ViT with iBOT masking. `forward(x [B, 3, H, W], masks [B, N] bool | None)` -> CLS [B, D], patches [B, N, D].

    Both outputs are after the final LayerNorm (DINOv2's `x_norm_clstoken` / `x_norm_patchtokens`).
    N = (H / patch) * (W / patch); `masks[b, n]` True replaces patch n of image b by the mask token.
    """

    def __init__(self, vit: VisionTransformer, patch_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.patch_size = patch_size
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        # DINOv2 starts the mask token at zero: a masked patch is then only its position embedding.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))

    @property
    def num_blocks(self) -> int:
        return len(self.vit.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (ViT-L at batch 96 needs it on 40-80 GB GPUs).

        Only block inputs [B, 1 + N, D] are kept; each block runs again in backward with the RNG state of its
        forward (torch's checkpoint restores it), so drop-path draws the same masks and the gradients are those
        of the plain forward. Without grad (the teacher) the blocks run plainly: there is nothing to save.
        """
        self.vit.set_grad_checkpointing(enable)

    def _embed(self, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        tokens = self.vit.patch_embed(x)  # [B, h, w, D] with dynamic_img_size
        if masks is not None:
            batch, grid_h, grid_w, dim = tokens.shape
            if masks.shape != (batch, grid_h * grid_w):
                raise ValueError(
                    f"masks must be [B, N] = [{batch}, {grid_h * grid_w}] for a {grid_h}x{grid_w} patch grid, "
                    f"got {list(masks.shape)}"
                )
            grid_mask = masks.to(device=tokens.device, dtype=torch.bool).view(batch, grid_h, grid_w, 1)
            tokens = torch.where(grid_mask, self.mask_token.to(tokens.dtype).view(1, 1, 1, dim), tokens)
        return self.vit._pos_embed(tokens)  # [B, 1 + N, D]: CLS + patches, position embedding added

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x [B, 3, H, W] normalised float; masks [B, N] bool or None -> dict(cls [B, D], patch [B, N, D])."""
        tokens = self._embed(x, masks)
        tokens = self.vit.norm_pre(self.vit.patch_drop(tokens))
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            # non-reentrant explicitly: the reentrant variant gives parameters no gradient when the input
            # (pixels) does not require grad, and timm's default follows an environment variable
            tokens = checkpoint_seq(self.vit.blocks, tokens, use_reentrant=False)
        else:
            tokens = self.vit.blocks(tokens)
        tokens = self.vit.norm(tokens)
        return {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens :]}

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The timm model's weights only (no mask token), detached CPU copies, for safetensors export."""
        return {k: v.detach().to("cpu").clone().contiguous() for k, v in self.vit.state_dict().items()}


def layer_id(param_name: str, num_blocks: int) -> int:
    """Depth of a backbone parameter for layer-wise lr decay, as DINOv2's `get_vit_lr_decay_rate`.

    Embeddings (patch_embed, pos_embed, cls_token, mask_token) -> 0, `blocks.{i}.*` -> i + 1, anything else
    (final norm, heads) -> num_blocks + 1. Works on names with any prefix (`student.backbone.vit.blocks.3...`).
    """
    if any(part in param_name for part in ("patch_embed", "pos_embed", "cls_token", "mask_token", "reg_token")):
        return 0
    marker = "blocks."
    if marker in param_name:
        return int(param_name[param_name.index(marker) + len(marker) :].split(".")[0]) + 1
    return num_blocks + 1


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the ViT from `cfg` (random init; weights come from checkpoints, never from a hub)."""
    kwargs = timm_create_kwargs(cfg)
    vit = create_vit(**kwargs)
    _set_drop_path(vit, cfg.drop_path_rate, cfg.drop_path_uniform)
    if vit.num_reg_tokens:
        raise ConfigError(f"backbone.arch: {cfg.arch} has {vit.num_reg_tokens} register tokens; the recipe uses none")
    backbone = Backbone(vit, cfg.patch_size)
    backbone.set_grad_checkpointing(cfg.grad_checkpointing)
    logger.info(
        "backbone %s: %d blocks, dim %d, %d px / %d px patches, drop-path %.2f (%s), grad checkpointing %s",
        cfg.arch,
        backbone.num_blocks,
        backbone.embed_dim,
        cfg.img_size,
        cfg.patch_size,
        cfg.drop_path_rate,
        "uniform" if cfg.drop_path_uniform else "linear",
        cfg.grad_checkpointing,
    )
    return backbone
