"""DINO/iBOT head and the per-expert projection heads.

Both are DINOv2's `DINOHead` (dinov2/layers/dino_head.py): an MLP to a bottleneck, L2 normalisation, then a
weight-normalised linear layer without bias named `last_layer` (param groups match that name to freeze it for
the first epoch). GPFM builds its expert heads as `DINOHead(nlayers=1, bottleneck_dim=256)`
(GPFM pretrain/dinov2/train/ssl_meta_arch.py): Linear(D -> 256) -> L2-normalise -> weight-normalised
Linear(256 -> D_expert); `ExpertProjectionHead` is that.

Weight norm uses `torch.nn.utils.parametrizations.weight_norm` (dim 0: one gain per output row). Its gain g
(`last_layer.parametrizations.weight.original0`) starts at 1 as in DINOv2; with `fix_norm=True` it also stays
at 1 (requires_grad False), which is DINO v1's `norm_last_layer=True`: each prototype is a unit vector, so the
logits are cosines. DINOv2 (and GPFM) train g after the first epoch: pass `fix_norm=False` for that.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm

from gpfm_scale.models.config import HeadConfig


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _build_mlp(num_layers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Module:
    if num_layers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(num_layers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


def _normalised_last_layer(bottleneck_dim: int, out_dim: int, fix_norm: bool) -> nn.Linear:
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
    gain = layer.parametrizations.weight.original0  # g: [out_dim, 1]
    with torch.no_grad():
        gain.fill_(1.0)
    gain.requires_grad_(not fix_norm)
    return layer


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dim; eps as DINOv2 (1e-6 in fp16, where 1e-12 underflows)."""
    eps = 1e-6 if x.dtype == torch.float16 else 1e-12
    return nn.functional.normalize(x, dim=-1, p=2, eps=eps)


class DinoHead(nn.Module):
    """[..., in_dim] -> MLP (GELU) -> [..., bottleneck] -> L2 -> weight-normed linear -> [..., out_dim] logits."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        fix_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.mlp = _build_mlp(num_layers, in_dim, hidden_dim, bottleneck_dim)
        self.mlp.apply(_init_linear)
        self.last_layer = _normalised_last_layer(bottleneck_dim, out_dim, fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(l2_normalise(self.mlp(x)))


class ExpertProjectionHead(DinoHead):
    """Student token(s) [..., in_dim] -> the expert's space [..., out_dim]: Linear -> L2 -> weight-normed Linear.

    One head per expert maps the student CLS [B, D] and every student patch token [B, N, D] alike.
    """

    def __init__(self, in_dim: int, out_dim: int, bottleneck_dim: int = 256, fix_norm: bool = True) -> None:
        super().__init__(in_dim, out_dim, bottleneck_dim=bottleneck_dim, num_layers=1, fix_norm=fix_norm)


def build_dino_head(cfg: HeadConfig, in_dim: int) -> DinoHead:
    """The DINO (and shared iBOT) head of the recipe: in_dim -> 2048 -> 2048 -> 256 -> 65,536 prototypes."""
    return DinoHead(
        in_dim,
        cfg.num_prototypes,
        hidden_dim=cfg.hidden_dim,
        bottleneck_dim=cfg.bottleneck_dim,
        num_layers=cfg.num_layers,
        fix_norm=cfg.fix_last_layer_norm,
    )


def build_expert_head(cfg: HeadConfig, in_dim: int, expert_dim: int) -> ExpertProjectionHead:
    """One expert's projection head: in_dim -> 256 -> L2 -> expert_dim."""
    return ExpertProjectionHead(in_dim, expert_dim, cfg.expert_bottleneck_dim, fix_norm=cfg.fix_last_layer_norm)
