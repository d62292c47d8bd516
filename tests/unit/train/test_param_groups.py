"""Parameter groups on a tiny timm ViT plus a DINO-like head: which tensors decay, with what lr multiplier."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from gpfm_scale.models.config import BackboneConfig, ExpertConfig, HeadConfig, ModelConfig
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.config import OptimConfig
from gpfm_scale.train.param_groups import apply_schedule, build_param_groups, param_rules
from gpfm_scale.train.schedules import ScheduleValues

D = 0.9  # layer-wise decay; the ViT has depth 2, so layer ids 0..3 get D**3, D**2, D, 1


class TinyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(32, 8)
        self.last_layer = weight_norm(nn.Linear(8, 16, bias=False))


def _student() -> nn.ModuleDict:
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=16,
        depth=2,
        embed_dim=32,
        num_heads=2,
        init_values=1e-5,
        pretrained=False,
    )
    return nn.ModuleDict({"backbone": vit, "dino_head": TinyHead()})


EXPECTED = {  # name: (lr_multiplier, wd_multiplier, is_last_layer)
    "backbone.cls_token": (D**3, 1.0, False),  # decayed, as in DINOv2
    "backbone.pos_embed": (D**3, 1.0, False),
    "backbone.patch_embed.proj.weight": (D**3 * 0.2, 1.0, False),
    "backbone.patch_embed.proj.bias": (D**3 * 0.2, 0.0, False),
    "backbone.blocks.0.norm1.weight": (D**2, 0.0, False),
    "backbone.blocks.0.attn.qkv.weight": (D**2, 1.0, False),
    "backbone.blocks.0.attn.qkv.bias": (D**2, 0.0, False),
    "backbone.blocks.0.ls1.gamma": (D**2, 0.0, False),
    "backbone.blocks.1.mlp.fc2.weight": (D, 1.0, False),
    "backbone.blocks.1.ls2.gamma": (D, 0.0, False),
    "backbone.norm.weight": (1.0, 0.0, False),
    "backbone.head.weight": (1.0, 1.0, False),
    "dino_head.mlp.weight": (1.0, 1.0, False),
    "dino_head.mlp.bias": (1.0, 0.0, False),
    "dino_head.last_layer.parametrizations.weight.original1": (1.0, 1.0, True),
}


def test_rules_per_named_tensor() -> None:
    rules = {r.name: r for r in param_rules(_student(), OptimConfig())}
    for name, (lr_mult, wd_mult, last) in EXPECTED.items():
        rule = rules[name]
        assert (rule.lr_multiplier, rule.wd_multiplier, rule.is_last_layer) == (
            pytest.approx(lr_mult),
            wd_mult,
            last,
        ), name


def test_groups_are_fused_and_cover_every_trainable_tensor_once() -> None:
    student = _student()
    student["backbone"].head.weight.requires_grad_(False)  # frozen tensors are left out
    groups = build_param_groups(student, OptimConfig())
    in_groups = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in student.parameters() if p.requires_grad]
    assert sorted(in_groups) == sorted(trainable)
    keys = {(round(g["lr_multiplier"], 9), g["wd_multiplier"], g["is_last_layer"]) for g in groups}
    # tokens (D^3, decayed); patch embed, blocks 0 and 1, top level each with and without wd; the last layer
    assert len(keys) == len(groups) == 1 + 2 * 4 + 1


def test_bare_vit_and_apply_schedule() -> None:
    vit = _student()["backbone"]
    groups = build_param_groups(vit, OptimConfig(layerwise_decay=0.5))
    rules = {r.name: r for r in param_rules(vit, OptimConfig(layerwise_decay=0.5))}
    assert rules["blocks.0.attn.proj.weight"].lr_multiplier == pytest.approx(0.25)
    student = _student()
    optimizer = torch.optim.AdamW(build_param_groups(student, OptimConfig()), lr=0.0)
    apply_schedule(optimizer, ScheduleValues(lr=1e-3, wd=0.04, momentum=0.99, teacher_temp=0.04, last_layer_lr=0.0))
    for g in optimizer.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 1e-3 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(expected_lr)
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    assert len(groups) == 1 + 2 * 4  # bare ViT: no last-layer group


class WrappedBackbone(nn.Module):
    """Like models/vit.py's Backbone: the timm ViT under `.vit`, the iBOT mask token beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = _student()["backbone"]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 32))


def test_mask_token_beside_a_wrapped_vit_is_layer_zero() -> None:
    student = nn.ModuleDict({"backbone": WrappedBackbone(), "dino_head": TinyHead()})
    rules = {r.name: r for r in param_rules(student, OptimConfig())}
    assert (rules["backbone.mask_token"].lr_multiplier, rules["backbone.mask_token"].wd_multiplier) == (
        pytest.approx(D**3),
        1.0,
    )
    assert rules["backbone.vit.blocks.1.attn.qkv.weight"].lr_multiplier == pytest.approx(D)
    assert rules["dino_head.mlp.weight"].lr_multiplier == 1.0


def _dinov2_rule(name: str, depth: int, cfg: OptimConfig) -> tuple[float, float, bool]:
    """DINOv2's own rule (dinov2 utils/param_groups.py, get_vit_lr_decay_rate + get_params_groups_with_decay),
    written from its source by parameter name: (lr_multiplier, wd_multiplier, is_last_layer)."""
    layer_id = depth + 1
    if name.startswith("backbone"):
        embeds = (".pos_embed", ".patch_embed", ".mask_token", ".cls_token", ".register_tokens", ".reg_token")
        if any(key in name for key in embeds):
            layer_id = 0
        elif ".blocks." in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
    lr = cfg.layerwise_decay ** (depth + 1 - layer_id)
    if "patch_embed" in name:
        lr *= cfg.patch_embed_lr_mult
    wd = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
    return lr, wd, "last_layer" in name


def test_real_student_groups_match_dinov2_rule_for_every_tensor() -> None:
    """The trainer's student (wrapped timm DINOv2 ViT + mask token, DINO head, expert heads): every trainable
    tensor gets DINOv2's lr and wd multipliers, so pos_embed / cls_token / mask_token are decayed."""
    backbone = BackboneConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    head = HeadConfig(hidden_dim=48, bottleneck_dim=16, num_prototypes=64, expert_bottleneck_dim=16)
    experts = [ExpertConfig(name="tiny_a", cls_weight=1.0, patch_weight=0.25)]
    student = SSLMetaArch(ObjectiveConfig(model=ModelConfig(backbone=backbone, head=head, experts=experts))).student
    cfg = OptimConfig()
    rules = param_rules(student, cfg)
    names = {r.name for r in rules}
    assert {"backbone.mask_token", "backbone.vit.cls_token", "backbone.vit.pos_embed"} <= names
    assert any(".ls1." in n for n in names) and any("expert_heads" in n for n in names)
    for rule in rules:
        lr, wd, last = _dinov2_rule(rule.name, 2, cfg)
        assert (rule.lr_multiplier, rule.wd_multiplier, rule.is_last_layer) == (pytest.approx(lr), wd, last), rule.name
    decayed = {id(p) for g in build_param_groups(student, cfg) if g["wd_multiplier"] == 1.0 for p in g["params"]}
    tokens = [student["backbone"].mask_token, student["backbone"].vit.cls_token, student["backbone"].vit.pos_embed]
    assert all(id(t) in decayed for t in tokens)
