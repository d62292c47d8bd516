"""Published checkpoint layouts of UNI, Phikon and CONCH, and the numerics of the Phikon / CONCH adapters.

The key lists below are what we read in the sources (see the docstrings of `gpfm_scale/models/experts/{uni,
phikon,conch}.py`): one transformer layer plus every non-layer key, with published shapes. They are expanded to
all layers and loaded, as meta tensors (no memory), into meta-built experts: the load is strict, so this proves
the mapping covers every published key and every model parameter, with the right shapes.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from gpfm_scale.errors import CheckpointMismatchError
from gpfm_scale.models.experts import EXPERTS, Expert
from gpfm_scale.models.experts.phikon import PhikonExpert, build_phikon_trunk, hf_vit_to_timm
from gpfm_scale.models.experts.tiny import TinyBExpert
from gpfm_scale.models.experts.weights import drop_tolerated, load_strict

UNI_LAYER = {  # timm layout, ViT-L/16 with LayerScale (MahmoodLab/UNI pytorch_model.bin)
    "blocks.0.norm1.weight": [1024], "blocks.0.norm1.bias": [1024],
    "blocks.0.attn.qkv.weight": [3072, 1024], "blocks.0.attn.qkv.bias": [3072],
    "blocks.0.attn.proj.weight": [1024, 1024], "blocks.0.attn.proj.bias": [1024],
    "blocks.0.ls1.gamma": [1024],
    "blocks.0.norm2.weight": [1024], "blocks.0.norm2.bias": [1024],
    "blocks.0.mlp.fc1.weight": [4096, 1024], "blocks.0.mlp.fc1.bias": [4096],
    "blocks.0.mlp.fc2.weight": [1024, 4096], "blocks.0.mlp.fc2.bias": [1024],
    "blocks.0.ls2.gamma": [1024],
}
UNI_REST = {
    "cls_token": [1, 1, 1024], "pos_embed": [1, 197, 1024],
    "patch_embed.proj.weight": [1024, 3, 16, 16], "patch_embed.proj.bias": [1024],
    "norm.weight": [1024], "norm.bias": [1024],
}
PHIKON_LAYER = {  # Hugging Face ViTModel layout (owkin/phikon)
    "encoder.layer.0.attention.attention.query.weight": [768, 768],
    "encoder.layer.0.attention.attention.query.bias": [768],
    "encoder.layer.0.attention.attention.key.weight": [768, 768],
    "encoder.layer.0.attention.attention.key.bias": [768],
    "encoder.layer.0.attention.attention.value.weight": [768, 768],
    "encoder.layer.0.attention.attention.value.bias": [768],
    "encoder.layer.0.attention.output.dense.weight": [768, 768],
    "encoder.layer.0.attention.output.dense.bias": [768],
    "encoder.layer.0.intermediate.dense.weight": [3072, 768],
    "encoder.layer.0.intermediate.dense.bias": [3072],
    "encoder.layer.0.output.dense.weight": [768, 3072],
    "encoder.layer.0.output.dense.bias": [768],
    "encoder.layer.0.layernorm_before.weight": [768], "encoder.layer.0.layernorm_before.bias": [768],
    "encoder.layer.0.layernorm_after.weight": [768], "encoder.layer.0.layernorm_after.bias": [768],
}
PHIKON_REST = {
    "embeddings.cls_token": [1, 1, 768], "embeddings.position_embeddings": [1, 197, 768],
    "embeddings.patch_embeddings.projection.weight": [768, 3, 16, 16],
    "embeddings.patch_embeddings.projection.bias": [768],
    "layernorm.weight": [768], "layernorm.bias": [768],
    "pooler.dense.weight": [768, 768], "pooler.dense.bias": [768],  # tolerated, dropped
}
CONCH_LAYER = {  # CoCa layout (MahmoodLab/CONCH pytorch_model.bin): timm trunk without LayerScale
    "visual.trunk.blocks.0.norm1.weight": [768], "visual.trunk.blocks.0.norm1.bias": [768],
    "visual.trunk.blocks.0.attn.qkv.weight": [2304, 768], "visual.trunk.blocks.0.attn.qkv.bias": [2304],
    "visual.trunk.blocks.0.attn.proj.weight": [768, 768], "visual.trunk.blocks.0.attn.proj.bias": [768],
    "visual.trunk.blocks.0.norm2.weight": [768], "visual.trunk.blocks.0.norm2.bias": [768],
    "visual.trunk.blocks.0.mlp.fc1.weight": [3072, 768], "visual.trunk.blocks.0.mlp.fc1.bias": [3072],
    "visual.trunk.blocks.0.mlp.fc2.weight": [768, 3072], "visual.trunk.blocks.0.mlp.fc2.bias": [768],
}
CONCH_REST = {
    "visual.trunk.cls_token": [1, 1, 768], "visual.trunk.pos_embed": [1, 785, 768],
    "visual.trunk.patch_embed.proj.weight": [768, 3, 16, 16], "visual.trunk.patch_embed.proj.bias": [768],
    "visual.trunk.norm.weight": [768], "visual.trunk.norm.bias": [768],
    "visual.attn_pool_contrast.query": [1, 512],
    "visual.attn_pool_contrast.attn.q_proj_weight": [512, 512],
    "visual.attn_pool_contrast.attn.k_proj_weight": [512, 768],
    "visual.attn_pool_contrast.attn.v_proj_weight": [512, 768],
    "visual.attn_pool_contrast.attn.in_proj_bias": [1536],
    "visual.attn_pool_contrast.attn.out_proj.weight": [512, 512],
    "visual.attn_pool_contrast.attn.out_proj.bias": [512],
    "visual.attn_pool_contrast.ln_q.weight": [512], "visual.attn_pool_contrast.ln_q.bias": [512],
    "visual.attn_pool_contrast.ln_k.weight": [768], "visual.attn_pool_contrast.ln_k.bias": [768],
    "visual.ln_contrast.weight": [512], "visual.ln_contrast.bias": [512],
    "visual.proj_contrast": [512, 512],
    # tolerated, dropped: the captioning pooler, the text tower and decoder, the temperature
    "visual.attn_pool_caption.query": [256, 768],
    "visual.attn_pool_caption.attn.in_proj_weight": [2304, 768],
    "visual.attn_pool_caption.attn.in_proj_bias": [2304],
    "visual.attn_pool_caption.ln_q.weight": [768], "visual.ln_caption.weight": [768],
    "text.token_embedding.weight": [32007, 768], "text.positional_embedding": [128, 768],
    "text.transformer.resblocks.0.attn.in_proj_weight": [2304, 768],
    "text_decoder.ln_final.weight": [768], "logit_scale": [],
}
LAYOUTS = {  # name -> (one layer, the rest, layer key prefix, number of layers)
    "uni": (UNI_LAYER, UNI_REST, "blocks.", 24),
    "phikon": (PHIKON_LAYER, PHIKON_REST, "encoder.layer.", 12),
    "conch": (CONCH_LAYER, CONCH_REST, "visual.trunk.blocks.", 12),
}


def _published(name: str, skip: str | None = None) -> dict[str, torch.Tensor]:
    layer, rest, prefix, depth = LAYOUTS[name]
    keys = dict(rest)
    for i in range(depth):
        keys.update({k.replace(f"{prefix}0.", f"{prefix}{i}.", 1): shape for k, shape in layer.items()})
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items() if k != skip}


def _meta_expert(name: str) -> Expert:
    with torch.device("meta"):
        return EXPERTS.get(name)()


@pytest.mark.parametrize("name", ["uni", "phikon", "conch"])
def test_published_layout_loads_strictly(name: str, caplog) -> None:
    expert = _meta_expert(name)
    with caplog.at_level(logging.INFO, logger="gpfm_scale.models.experts"):
        expert.load_published_state_dict(_published(name))
    dropped = {"uni": None, "phikon": "dropped 2 tolerated keys", "conch": "dropped 10 tolerated keys"}[name]
    if dropped:
        assert dropped in caplog.text
    assert "text.* (3)" in caplog.text if name == "conch" else True


@pytest.mark.parametrize(
    ("name", "skip", "named"),
    [
        ("uni", "blocks.23.ls2.gamma", "blocks.23.ls2.gamma"),
        ("phikon", "encoder.layer.5.attention.attention.key.bias", "q/k/v (missing parts): layer 5 {key}.bias"),
        ("conch", "visual.proj_contrast", "missing 1: proj_contrast"),
    ],
)
def test_a_missing_published_key_is_named(name: str, skip: str, named: str) -> None:
    with pytest.raises(CheckpointMismatchError) as err:
        _meta_expert(name).load_published_state_dict(_published(name, skip=skip))
    assert named in str(err.value)


def test_an_untolerated_extra_key_is_refused() -> None:
    state = _published("conch")
    state["visual.head.proj.weight"] = torch.empty(512, 768, device="meta")
    with pytest.raises(CheckpointMismatchError, match="unexpected 1: head.proj.weight"):
        _meta_expert("conch").load_published_state_dict(state)
    state = _published("phikon")
    state["classifier.weight"] = torch.empty(2, 768, device="meta")
    with pytest.raises(CheckpointMismatchError, match="no timm name for HF keys: classifier.weight"):
        _meta_expert("phikon").load_published_state_dict(state)


def _fake_hf_vit(dim: int, depth: int, grid: int, patch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random `ViTModel` state dict with the published names, tiny sizes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: [dim if s == 768 else 4 * dim if s == 3072 else s for s in v] for k, v in PHIKON_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for i in range(depth):
        for key, shape in shapes.items():
            scale = 1.0 if "layernorm" in key and key.endswith("weight") else 0.0
            out[key.replace(".0.", f".{i}.", 1)] = scale + 0.2 * torch.randn(shape, generator=gen)
    out["embeddings.cls_token"] = torch.randn(1, 1, dim, generator=gen)
    out["embeddings.position_embeddings"] = torch.randn(1, grid * grid + 1, dim, generator=gen)
    out["embeddings.patch_embeddings.projection.weight"] = 0.1 * torch.randn(dim, 3, patch, patch, generator=gen)
    out["embeddings.patch_embeddings.projection.bias"] = torch.randn(dim, generator=gen)
    out["layernorm.weight"] = 1 + 0.2 * torch.randn(dim, generator=gen)
    out["layernorm.bias"] = 0.2 * torch.randn(dim, generator=gen)
    return out


def _hf_vit_forward(p: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """ViTModel's last_hidden_state written out from modeling_vit.py (separate q/k/v, eps 1e-12)."""
    dim, eps = p["layernorm.weight"].shape[0], 1e-12
    patch = p["embeddings.patch_embeddings.projection.weight"].shape[-1]
    t = F.conv2d(x, p["embeddings.patch_embeddings.projection.weight"],
                 p["embeddings.patch_embeddings.projection.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([p["embeddings.cls_token"].expand(x.shape[0], -1, -1), t], 1) + p["embeddings.position_embeddings"]
    batch, tokens, _ = t.shape
    for i in range(depth):
        w = {k[len(f"encoder.layer.{i}."):]: v for k, v in p.items() if k.startswith(f"encoder.layer.{i}.")}
        h = F.layer_norm(t, (dim,), w["layernorm_before.weight"], w["layernorm_before.bias"], eps)
        q, k, v = (F.linear(h, w[f"attention.attention.{n}.weight"], w[f"attention.attention.{n}.bias"])
                   .view(batch, tokens, heads, -1).transpose(1, 2) for n in ("query", "key", "value"))
        attn = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, tokens, dim)
        t = t + F.linear(attn, w["attention.output.dense.weight"], w["attention.output.dense.bias"])
        h = F.layer_norm(t, (dim,), w["layernorm_after.weight"], w["layernorm_after.bias"], eps)
        h = F.gelu(F.linear(h, w["intermediate.dense.weight"], w["intermediate.dense.bias"]))
        t = t + F.linear(h, w["output.dense.weight"], w["output.dense.bias"])
    return F.layer_norm(t, (dim,), p["layernorm.weight"], p["layernorm.bias"], eps)


@pytest.mark.parametrize("prefix", ["", "vit."])
def test_phikon_mapping_reproduces_the_hf_forward(prefix: str) -> None:
    hf = _fake_hf_vit(dim=32, depth=2, grid=2, patch=16)
    published = {prefix + k: v for k, v in hf.items()}
    published[prefix + "pooler.dense.weight"] = torch.zeros(32, 32)
    published[prefix + "embeddings.mask_token"] = torch.zeros(1, 1, 32)
    trunk = build_phikon_trunk(img_size=32, embed_dim=32, depth=2, num_heads=4)
    kept = drop_tolerated(published, PhikonExpert.tolerated_prefixes, "phikon")
    load_strict(trunk, hf_vit_to_timm(kept), "phikon")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(trunk.eval().forward_features(x), _hf_vit_forward(hf, x, depth=2, heads=4), atol=1e-5)


def test_phikon_incomplete_qkv_is_named() -> None:
    hf = _fake_hf_vit(dim=32, depth=2, grid=2, patch=16)
    del hf["encoder.layer.1.attention.attention.value.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"layer 1 \{value\}\.weight"):
        hf_vit_to_timm(hf)


def test_conch_attentional_pooling_by_hand() -> None:
    visual = TinyBExpert().model  # ConchVisual with a tiny trunk: the same modules as CONCH
    pool = visual.attn_pool_contrast
    with torch.no_grad():
        for param in (pool.attn.in_proj_bias, pool.attn.out_proj.bias, pool.ln_q.bias, pool.ln_k.weight):
            param.add_(0.3 * torch.randn_like(param))
    x = torch.randn(2, 3, 48, 48)
    tokens = visual.trunk.forward_features(x)  # [B, 1 + 9, 64], CLS included as in CONCH
    dim, heads = 32, pool.attn.num_heads  # pooled width 32 from trunk width 64 (CONCH: 512 from 768)
    keys = F.layer_norm(tokens, (64,), pool.ln_k.weight, pool.ln_k.bias)
    query = F.layer_norm(pool.query, (dim,), pool.ln_q.weight, pool.ln_q.bias)
    bq, bk, bv = pool.attn.in_proj_bias.chunk(3)
    q = F.linear(query, pool.attn.q_proj_weight, bq).view(1, heads, -1).transpose(0, 1)  # [H, 1, hd]
    k = F.linear(keys, pool.attn.k_proj_weight, bk).view(2, -1, heads, dim // heads).transpose(1, 2)
    v = F.linear(keys, pool.attn.v_proj_weight, bv).view(2, -1, heads, dim // heads).transpose(1, 2)
    attn = torch.softmax(q.unsqueeze(0) @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1) @ v  # [B, H, 1, hd]
    pooled = F.linear(attn.transpose(1, 2).reshape(2, dim), pool.attn.out_proj.weight, pool.attn.out_proj.bias)
    expected = F.layer_norm(pooled, (dim,), visual.ln_contrast.weight, visual.ln_contrast.bias) @ visual.proj_contrast
    assert torch.allclose(visual(x), expected, atol=1e-5)


def test_phikon_mapping_accepts_the_transformers5_layer_names() -> None:
    # transformers >= 5 re-saves ViTModel as layers.{i}.attention.{q,k,v,o}_proj / layers.{i}.mlp.fc{1,2}.
    renames = {
        "encoder.layer.": "layers.", "attention.attention.query": "attention.q_proj",
        "attention.attention.key": "attention.k_proj", "attention.attention.value": "attention.v_proj",
        "attention.output.dense": "attention.o_proj", "intermediate.dense": "mlp.fc1", ".output.dense": ".mlp.fc2",
    }
    hf = _fake_hf_vit(dim=32, depth=2, grid=2, patch=16)
    v5 = {}
    for key, value in hf.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        v5[key] = value
    assert "layers.1.mlp.fc2.weight" in v5 and "layers.0.attention.o_proj.bias" in v5
    old, new = hf_vit_to_timm(hf), hf_vit_to_timm(v5)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
