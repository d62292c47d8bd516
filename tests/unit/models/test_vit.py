"""Backbone: shapes, recipe geometry, iBOT mask token, position-embedding interpolation, export to plain timm."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gpfm_scale.config import build_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import BackboneConfig
from gpfm_scale.models.vit import Backbone, build_backbone, layer_id, timm_create_kwargs

# Tiny stand-in for ViT-L/14 at 224 (16 x 16 grid) with 98-px local crops (7 x 7): 32 px / 8 = 4 x 4, 24 px = 3 x 3.
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(**TINY))
    model.eval()  # drop-path off: outputs must be deterministic
    return model


def test_output_shapes_global_and_local_crops(backbone: Backbone) -> None:
    global_out = backbone(torch.randn(3, 3, 32, 32))
    local_out = backbone(torch.randn(5, 3, 24, 24))
    assert global_out["cls"].shape == (3, 32) and global_out["patch"].shape == (3, 16, 32)
    assert local_out["cls"].shape == (5, 32) and local_out["patch"].shape == (5, 9, 32)


def test_outputs_are_after_the_final_layernorm(backbone: Backbone) -> None:
    # At init the final LayerNorm has weight 1 and bias 0, so every output token has mean 0 and variance 1
    # (the CLS token is tiny at init, ~0.02, so LayerNorm's eps lowers its variance a little).
    out = backbone(torch.randn(2, 3, 32, 32))
    tokens = torch.cat([out["cls"][:, None], out["patch"]], dim=1)
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 17), atol=1e-5)
    assert torch.allclose(tokens.var(-1, unbiased=False), torch.ones(2, 17), atol=1e-2)
    assert torch.allclose(out["patch"].var(-1, unbiased=False), torch.ones(2, 16), atol=1e-4)


def test_default_config_is_the_recipe_vit_l14() -> None:
    with torch.device("meta"):
        model = build_backbone(BackboneConfig())
    vit = model.vit
    assert model.num_blocks == 24 and model.embed_dim == 1024 and vit.blocks[0].attn.num_heads == 16
    assert vit.blocks[0].mlp.fc1.out_features == 4096  # MLP FFN, ratio 4
    assert vit.num_reg_tokens == 0 and vit.num_prefix_tokens == 1
    assert vit.pos_embed.shape == (1, 1 + 16 * 16, 1024)
    assert vit.patch_embed.proj.kernel_size == (14, 14)
    assert all(b.drop_path1.drop_prob == 0.4 and b.drop_path2.drop_prob == 0.4 for b in vit.blocks)
    assert model.mask_token.shape == (1, 1, 1024)


def test_layerscale_init_and_linear_drop_path_option() -> None:
    model = build_backbone(BackboneConfig(**{**TINY, "depth": 3}, drop_path_uniform=False, drop_path_rate=0.2))
    assert all(torch.all(b.ls1.gamma == 1e-5) and torch.all(b.ls2.gamma == 1e-5) for b in model.vit.blocks)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.vit.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_layerscale_none_disables_it_even_for_an_arch_whose_default_has_it() -> None:
    cfg = BackboneConfig(**{**TINY, "arch": "vit_large_patch14_dinov2", "patch_size": 8}, layerscale_init=None)
    model = build_backbone(cfg)
    assert all(isinstance(b.ls1, torch.nn.Identity) and isinstance(b.ls2, torch.nn.Identity) for b in model.vit.blocks)


def _patch_region(index: int, grid: int = 4, patch: int = 8) -> tuple[slice, slice]:
    row, col = divmod(index, grid)
    return slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)


def test_all_false_mask_equals_no_mask(backbone: Backbone) -> None:
    x = torch.randn(2, 3, 32, 32)
    masked = backbone(x, torch.zeros(2, 16, dtype=torch.bool))
    plain = backbone(x)
    assert torch.equal(masked["patch"], plain["patch"]) and torch.equal(masked["cls"], plain["cls"])


def test_masked_patches_no_longer_see_their_pixels(backbone: Backbone) -> None:
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5]] = True
    masks[1, 15] = True
    changed = x.clone()
    for image, index in ((0, 0), (0, 5), (1, 15)):
        rows, cols = _patch_region(index)
        changed[image, :, rows, cols] = torch.randn(3, 8, 8) * 5
    # Pixels under masked patches are replaced by the mask token: every output is unchanged.
    assert torch.allclose(backbone(x, masks)["patch"], backbone(changed, masks)["patch"], atol=1e-6)
    assert torch.allclose(backbone(x, masks)["cls"], backbone(changed, masks)["cls"], atol=1e-6)
    # Without the mask those pixels matter, so the test above is not vacuous.
    assert not torch.allclose(backbone(x)["patch"], backbone(changed)["patch"], atol=1e-3)


def test_mask_token_value_is_used_and_trained(backbone: Backbone) -> None:
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, 3] = True
    before = backbone(x, masks)["patch"]
    shift = torch.randn(1, 1, 32)  # not a constant: LayerNorm would cancel a constant shift
    with torch.no_grad():
        backbone.mask_token.add_(shift)
    after = backbone(x, masks)
    with torch.no_grad():
        backbone.mask_token.sub_(shift)
    assert not torch.allclose(before, after["patch"], atol=1e-4)
    after["patch"].sum().backward()
    assert backbone.mask_token.grad is not None and backbone.mask_token.grad.abs().sum() > 0
    backbone.zero_grad(set_to_none=True)
    backbone(x)["patch"].sum().backward()
    assert backbone.mask_token.grad is None  # unmasked forward does not touch it
    backbone.zero_grad(set_to_none=True)


def test_wrong_mask_shape_is_refused(backbone: Backbone) -> None:
    with pytest.raises(ValueError, match=r"\[2, 9\]"):
        backbone(torch.randn(2, 3, 24, 24), torch.zeros(2, 16, dtype=torch.bool))


def test_local_crop_position_embedding_is_bicubic_antialiased(backbone: Backbone) -> None:
    # Recompute a 24-px forward by hand: the 4 x 4 patch position grid resized to 3 x 3 with torch's bicubic.
    vit = backbone.vit
    x = torch.randn(1, 3, 24, 24)
    tokens = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=8).flatten(2).transpose(1, 2)
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    pos = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True, align_corners=False)
    pos = torch.cat([vit.pos_embed[:, :1], pos.flatten(2).transpose(1, 2)], dim=1)
    seq = torch.cat([vit.cls_token, tokens], dim=1) + pos
    expected = vit.norm(vit.blocks(seq))
    out = backbone(x)
    assert torch.allclose(out["patch"], expected[:, 1:], atol=1e-5)
    assert torch.allclose(out["cls"], expected[:, 0], atol=1e-5)


def test_export_loads_into_plain_timm_with_same_outputs(backbone: Backbone, tmp_path) -> None:
    cfg = BackboneConfig(**TINY)
    path = tmp_path / "teacher.safetensors"
    save_file(backbone.export_state_dict(), str(path))
    state = load_file(str(path))
    assert "mask_token" not in state and "blocks.1.attn.qkv.weight" in state
    plain = timm.create_model(**timm_create_kwargs(cfg))
    plain.load_state_dict(state, strict=True)
    plain.eval()
    for size in (32, 24):
        x = torch.randn(2, 3, size, size)
        ours = backbone(x)
        theirs = plain.forward_features(x)
        assert torch.allclose(ours["cls"], theirs[:, 0], atol=1e-6)
        assert torch.allclose(ours["cls"], plain(x), atol=1e-6)  # timm's pooled output is the same CLS
        assert torch.allclose(ours["patch"], theirs[:, 1:], atol=1e-6)


def test_config_rejects_bad_geometry_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        build_config(BackboneConfig, {"img_size": 30, "patch_size": 8})
    with pytest.raises(ConfigError, match="unknown key 'registers'"):
        build_config(BackboneConfig, {"registers": 4})


@pytest.mark.parametrize("arch", ["resnet18", "no_such_vit"])
def test_non_vit_arch_is_a_config_error(arch: str) -> None:
    with pytest.raises(ConfigError, match=arch):
        build_backbone(BackboneConfig(**{**TINY, "arch": arch}))


def test_layer_ids_for_layerwise_lr_decay(backbone: Backbone) -> None:
    ids = {name: layer_id(f"student.backbone.{name}", backbone.num_blocks) for name, _ in backbone.named_parameters()}
    assert ids["mask_token"] == 0 and ids["vit.cls_token"] == 0 and ids["vit.patch_embed.proj.weight"] == 0
    assert ids["vit.blocks.0.attn.qkv.weight"] == 1 and ids["vit.blocks.1.ls2.gamma"] == 2
    assert ids["vit.norm.weight"] == 3
