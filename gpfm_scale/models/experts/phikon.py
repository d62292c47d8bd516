"""Phikon (Owkin): iBOT ViT-B/16 at 224 px, published as a Hugging Face `ViTModel`; run here as timm
`vit_base_patch16_224` after a key mapping, so no `transformers` dependency is needed.

Where the names come from: huggingface/transformers src/transformers/models/vit/modeling_vit.py (`ViTModel`,
`ViTEmbeddings`, `ViTLayer`, `ViTSelfAttention`, `ViTPooler`) and the owkin/phikon `config.json` on the Hugging
Face hub (ViTModel, hidden 768, 12 layers, 12 heads, intermediate 3072, qkv_bias true, gelu,
layer_norm_eps 1e-12). GPFM loads it with `ViTModel.from_pretrained("owkin/phikon", add_pooling_layer=False)`
and takes `last_hidden_state` (after the final LayerNorm): CLS = `[:, 0]`, patches = `[:, 1:]`
(birkhoffkiki/GPFM pretrain/dinov2/fms.py, class `Phikon`).

Mapping (HF -> timm), `{i}` the layer index:
  embeddings.cls_token                                  -> cls_token                 [1, 1, 768]
  embeddings.position_embeddings                        -> pos_embed                 [1, 197, 768]
  embeddings.patch_embeddings.projection.{weight,bias}  -> patch_embed.proj.*        [768, 3, 16, 16]
  encoder.layer.{i}.attention.attention.{query,key,value}.{weight,bias}
                                                        -> blocks.{i}.attn.qkv.*     concatenated q, k, v on dim 0
  encoder.layer.{i}.attention.output.dense.*            -> blocks.{i}.attn.proj.*
  encoder.layer.{i}.layernorm_before.*                  -> blocks.{i}.norm1.*
  encoder.layer.{i}.layernorm_after.*                   -> blocks.{i}.norm2.*
  encoder.layer.{i}.intermediate.dense.*                -> blocks.{i}.mlp.fc1.*      [3072, 768]
  encoder.layer.{i}.output.dense.*                      -> blocks.{i}.mlp.fc2.*      [768, 3072]
  layernorm.*                                           -> norm.*
A `vit.` prefix (a file saved from a task model such as ViTForMaskedImageModeling) is stripped. transformers 5
renamed the layers (`layers.{i}.attention.{q,k,v,o}_proj`, `layers.{i}.mlp.fc{1,2}`, read in its
models/vit/modeling_vit.py) and converts old files on load; a file re-saved that way maps too. Tolerated and
dropped: `pooler.dense.*` (ViTModel's default tanh pooler, unused: GPFM builds it with add_pooling_layer=False)
and `embeddings.mask_token` (present when saved with use_mask_token=True; only used for masked inputs).
The two blocks are numerically the same: HF's layer is LN -> attention -> residual -> LN -> MLP -> residual,
timm's Block is the same pre-norm order; q, k, v stacked in that order is timm's qkv layout. Checked once
against transformers 5.24 `ViTModel` (tiny random config): identical `last_hidden_state` at the native size
(max |diff| 0.0). At other sizes the position embeddings differ slightly (HF: bicubic; timm: antialiased
bicubic), which does not arise at Phikon's 224 px.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from gpfm_scale.errors import CheckpointMismatchError
from gpfm_scale.models.config import Preprocessing
from gpfm_scale.contracts.model_input import IMAGENET_MEAN, IMAGENET_STD
from gpfm_scale.models.experts.base import EXPERTS, Expert, ExpertSpec
from gpfm_scale.models.experts.weights import name_list
from gpfm_scale.models.vit import create_vit

PHIKON_LAYER_NORM_EPS = 1e-12  # owkin/phikon config.json (HF default); timm would use 1e-6

_DIRECT = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER_RENAMES = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    # transformers >= 5 names (`layers.{i}.attention.o_proj`, `layers.{i}.mlp.fc1`): a file re-saved with it
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("query", "key", "value")  # timm's qkv rows: q, then k, then v
_QKV_MODULES = {f"attention.attention.{part}": part for part in _QKV} | {
    f"attention.{short}_proj": part for short, part in zip("qkv", _QKV)
}


def hf_vit_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face `ViTModel` keys -> timm `VisionTransformer` keys (see the module docstring).

    Raises CheckpointMismatchError naming keys it has no timm name for, or q/k/v triples that are incomplete.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {query: .., key: ..}
    unknown: list[str] = []
    for key, value in state_dict.items():
        hf_key = key.removeprefix("vit.")
        if hf_key in _DIRECT:
            out[_DIRECT[hf_key]] = value
            continue
        match = _LAYER_KEY.match(hf_key)
        index, module, leaf = match.groups() if match else ("", "", "")
        if module in _LAYER_RENAMES:
            out[f"blocks.{index}.{_LAYER_RENAMES[module]}.{leaf}"] = value
        elif module in _QKV_MODULES:
            qkv.setdefault((index, leaf), {})[_QKV_MODULES[module]] = value
        else:
            unknown.append(key)
    incomplete = sorted(
        f"layer {index} {{{','.join(p for p in _QKV if p not in parts)}}}.{leaf}"
        for (index, leaf), parts in qkv.items()
        if len(parts) != len(_QKV)
    )
    if unknown or incomplete:
        raise CheckpointMismatchError(
            f"phikon: no timm name for HF keys: {name_list(sorted(unknown)) or '-'}; "
            f"incomplete q/k/v (missing parts): {name_list(incomplete) or '-'}"
        )
    for (index, leaf), parts in sorted(qkv.items()):
        out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def build_phikon_trunk(
    img_size: int = 224, embed_dim: int = 768, depth: int = 12, num_heads: int = 12
) -> VisionTransformer:
    """timm ViT with Phikon's geometry and LayerNorm eps; sizes overridable for tiny tests of the mapping."""
    return create_vit(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=img_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=0,
        dynamic_img_size=True,
        norm_layer=partial(nn.LayerNorm, eps=PHIKON_LAYER_NORM_EPS),
    )


@EXPERTS.register("phikon")
class PhikonExpert(Expert):
    spec = ExpertSpec(
        name="phikon",
        embed_dim=768,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=16,
        has_patch_tokens=True,
        weights_note="Phikon weights: model.safetensors or pytorch_model.bin of the Hugging Face repo "
        "owkin/phikon (check its model card for the licence terms); download it yourself.",
    )
    model: VisionTransformer
    tolerated_prefixes = ("pooler.", "vit.pooler.", "embeddings.mask_token", "vit.embeddings.mask_token")

    def __init__(self, preprocessing: Preprocessing = "gpfm_original") -> None:
        super().__init__(preprocessing)
        self.model = build_phikon_trunk()
        self.freeze()

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return hf_vit_to_timm(state_dict)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        tokens = self.model.forward_features(x)  # == HF last_hidden_state [B, 1 + N, 768]
        return {"cls": tokens[:, 0], "patch": tokens[:, self.model.num_prefix_tokens :]}
