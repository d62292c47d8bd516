"""CONCH (Mahmood Lab) vision tower: ViT-B/16 trunk at 448 px + attentional pooling -> 512-d contrastive embedding.

Read from mahmoodlab/CONCH: conch/open_clip_custom/model_configs/conch_ViT-B-16.json (embed_dim 512, image_size
448, patch 16, attn_pooler_heads 8, n_queries_contrast 1, n_queries_caption 256, embed_dim_caption 768),
coca_model.py (`_build_vision_tower`: the trunk is `timm.models.vision_transformer.VisionTransformer(embed_dim=768,
depth=12, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16, num_classes=0, dynamic_img_size=True)` with
`forward = forward_features`), vision_tower.py (`VisualModel.forward`: pooled = attn_pool_contrast(tokens)[:, 0]
-> ln_contrast -> @ proj_contrast), transformer.py (`AttentionalPooler`: `query` [n_queries, d_model],
`attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)`, `ln_q`, `ln_k`; keys are
LayerNormed, the query is LayerNormed, tokens attended include the CLS token) and factory.py (`read_state_dict`:
optional "state_dict" wrapper and "module." prefix; the CoCa model's keys sit under `visual.`, `text.`,
`text_decoder.`, `logit_scale`).

Checkpoint keys used (pytorch_model.bin of MahmoodLab/CONCH, CoCa layout), with the `visual.` prefix stripped:
  visual.trunk.*                      timm ViT-B/16 keys, pos_embed [1, 785, 768] (1 + 28 x 28)
  visual.attn_pool_contrast.query     [1, 512]
  visual.attn_pool_contrast.attn.{q_proj_weight [512, 512], k_proj_weight [512, 768], v_proj_weight [512, 768],
      in_proj_bias [1536], out_proj.weight [512, 512], out_proj.bias [512]}  (separate q/k/v: kdim != embed_dim)
  visual.attn_pool_contrast.ln_q.*    [512];  visual.attn_pool_contrast.ln_k.* [768]
  visual.ln_contrast.*                [512];  visual.proj_contrast [512, 512]
Tolerated and dropped: `text.*` (text encoder), `text_decoder.*` (captioning decoder), `logit_scale`,
`visual.attn_pool_caption.*` and `visual.ln_caption.*` (the 256-query captioning pooler: not a distillation target).

Target: CLS = the projected 512-d contrastive embedding, L2-normalised (GPFM normalises it, fms.py `CONCH`); no
patch tokens. GPFM fed CONCH the 224-px ImageNet-normalised global crops (the trunk's position embedding is then
interpolated to 14 x 14): that is the default (`preprocessing: gpfm_original`); `native` gives CONCH its own 448 px
and OpenAI CLIP mean/std.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from gpfm_scale.models.config import Preprocessing
from gpfm_scale.models.experts.base import EXPERTS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Expert, ExpertSpec
from gpfm_scale.models.heads import l2_normalise
from gpfm_scale.models.vit import create_vit


class AttentionalPooler(nn.Module):
    """Learned queries [Q, d] cross-attend to LayerNormed tokens [B, L, C] -> [B, Q, d] (open_clip CoCa)."""

    def __init__(self, d_model: int, context_dim: int, num_heads: int = 8, num_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, num_heads, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens).transpose(0, 1)  # [L, B, C]: nn.MultiheadAttention is sequence-first here
        query = self.ln_q(self.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)  # [Q, B, d]
        pooled = self.attn(query, keys, keys, need_weights=False)[0]  # [Q, B, d]
        return pooled.transpose(0, 1)


class ConchVisual(nn.Module):
    """CONCH's `VisualModel` contrastive path: trunk tokens [B, 1 + N, C] -> pool -> LN -> @ proj -> [B, out_dim]."""

    def __init__(self, trunk: VisionTransformer, out_dim: int = 512, pool_heads: int = 8) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(out_dim, trunk.embed_dim, pool_heads, num_queries=1)
        self.ln_contrast = nn.LayerNorm(out_dim)
        self.proj_contrast = nn.Parameter(out_dim**-0.5 * torch.randn(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast


@EXPERTS.register("conch")
class ConchExpert(Expert):
    spec = ExpertSpec(
        name="conch",
        embed_dim=512,
        input_size=448,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        patch_size=16,
        has_patch_tokens=False,
        weights_note="CONCH weights: pytorch_model.bin of the gated Hugging Face repo MahmoodLab/CONCH "
        "(CC-BY-NC-ND 4.0, research use; accept the terms and download it yourself).",
    )
    model: ConchVisual
    tolerated_prefixes = ("text.", "text_decoder.", "logit_scale", "visual.attn_pool_caption.", "visual.ln_caption.")

    def __init__(self, preprocessing: Preprocessing = "gpfm_original") -> None:
        super().__init__(preprocessing)
        trunk = create_vit("vit_base_patch16_224", pretrained=False, img_size=448, num_classes=0, dynamic_img_size=True)
        self.model = ConchVisual(trunk, out_dim=512, pool_heads=8)
        self.freeze()

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Strip `visual.`; any other key is left as it is and reported as unexpected by the strict load."""
        return {(k.removeprefix("visual.")): v for k, v in state_dict.items()}

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {"cls": l2_normalise(self.model(x)), "patch": None}
