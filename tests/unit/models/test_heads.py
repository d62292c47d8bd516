"""DINO head and expert projection heads: structure, shapes, weight-normalised last layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpfm_scale.models.config import HeadConfig
from gpfm_scale.models.heads import DinoHead, ExpertProjectionHead, build_dino_head, build_expert_head


def _effective_weight(head: DinoHead) -> torch.Tensor:
    return head.last_layer.weight  # recomputed from (g, v) by the parametrization


def test_recipe_head_structure() -> None:
    with torch.device("meta"):
        head = build_dino_head(HeadConfig(), in_dim=1024)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert head.last_layer.in_features == 256 and head.last_layer.out_features == 65536
    assert head.last_layer.bias is None


def test_dino_head_shapes_for_cls_and_patch_tokens() -> None:
    head = DinoHead(16, 40, hidden_dim=24, bottleneck_dim=8, num_layers=3)
    assert head(torch.randn(5, 16)).shape == (5, 40)
    assert head(torch.randn(2, 7, 16)).shape == (2, 7, 40)


def test_logits_are_cosines_to_unit_prototypes() -> None:
    torch.manual_seed(0)
    head = DinoHead(16, 40, hidden_dim=24, bottleneck_dim=8, num_layers=2)
    x = torch.randn(5, 16)
    v = head.last_layer.parametrizations.weight.original1
    expected = F.normalize(head.mlp(x), dim=-1) @ F.normalize(v, dim=-1).T  # by hand
    out = head(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.abs().max() <= 1.0 + 1e-6
    assert torch.allclose(_effective_weight(head).norm(dim=1), torch.ones(40), atol=1e-6)


def test_fixed_norm_stays_one_after_training_steps() -> None:
    torch.manual_seed(0)
    head = DinoHead(16, 40, hidden_dim=24, bottleneck_dim=8)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    assert "last_layer.parametrizations.weight.original1" in names  # freezable by the name `last_layer`
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        (head(torch.randn(8, 16)) ** 2).sum().backward()
        optimizer.step()
    assert torch.all(gain == 1)
    assert torch.allclose(_effective_weight(head).norm(dim=1), torch.ones(40), atol=1e-5)


def test_trainable_norm_option() -> None:
    head = DinoHead(16, 40, hidden_dim=24, bottleneck_dim=8, fix_norm=False)
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.requires_grad and torch.all(gain == 1)


def test_expert_projection_head_is_linear_l2_weightnormed_linear() -> None:
    torch.manual_seed(0)
    head = build_expert_head(HeadConfig(expert_bottleneck_dim=12), in_dim=16, expert_dim=30)
    assert isinstance(head, ExpertProjectionHead)
    assert isinstance(head.mlp, nn.Linear) and (head.mlp.in_features, head.mlp.out_features) == (16, 12)
    cls, patches = torch.randn(4, 16), torch.randn(4, 9, 16)
    assert head(cls).shape == (4, 30) and head(patches).shape == (4, 9, 30)
    # The same head maps CLS and each patch token alike.
    assert torch.allclose(head(patches)[:, 4], head(patches[:, 4]), atol=1e-6)
    v = head.last_layer.parametrizations.weight.original1
    expected = F.normalize(F.linear(cls, head.mlp.weight, head.mlp.bias), dim=-1) @ F.normalize(v, dim=-1).T
    assert torch.allclose(head(cls), expected, atol=1e-6)
