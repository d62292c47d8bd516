"""UNI (Mahmood Lab): ViT-L/16 at 224 px, DINOv2-trained on Mass-100K; 1024-d CLS and 14 x 14 patch tokens.

Architecture and checkpoint layout as GPFM uses it (birkhoffkiki/GPFM pretrain/dinov2/fms.py, class `UNI`) and as
UNI's model card documents: `timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16,
init_values=1e-5, num_classes=0, dynamic_img_size=True)` then `load_state_dict(<pytorch_model.bin>,
strict=True)`. So the published file is in timm's own key layout (`cls_token`, `pos_embed` [1, 197, 1024],
`patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*`,
`norm.*`) with no head: nothing to map, nothing tolerated.

Targets: CLS = the final-normed CLS token (timm `forward_head` with global_pool "token" and num_classes 0);
patch = the final-normed patch tokens [B, 196, 1024] at 224 px.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from gpfm_scale.models.config import Preprocessing
from gpfm_scale.contracts.model_input import IMAGENET_MEAN, IMAGENET_STD
from gpfm_scale.models.experts.base import EXPERTS, Expert, ExpertSpec
from gpfm_scale.models.vit import create_vit

UNI_TIMM_ARCH = "vit_large_patch16_224"
UNI_TIMM_KWARGS: dict[str, Any] = {
    "pretrained": False,
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "num_classes": 0,
    "dynamic_img_size": True,
}


@EXPERTS.register("uni")
class UNIExpert(Expert):
    spec = ExpertSpec(
        name="uni",
        embed_dim=1024,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=16,
        has_patch_tokens=True,
        weights_note="UNI weights: pytorch_model.bin of the gated Hugging Face repo MahmoodLab/UNI "
        "(CC-BY-NC-ND 4.0, research use; accept the terms and download it yourself).",
    )
    model: VisionTransformer

    def __init__(self, preprocessing: Preprocessing = "gpfm_original") -> None:
        super().__init__(preprocessing)
        self.model = create_vit(UNI_TIMM_ARCH, **UNI_TIMM_KWARGS)
        self.freeze()

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        tokens = self.model.forward_features(x)  # [B, 1 + N, 1024], after the final norm
        prefix = self.model.num_prefix_tokens
        return {"cls": tokens[:, 0], "patch": tokens[:, prefix:]}
