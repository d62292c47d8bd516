"""Tiny random-init experts for CPU tests, with the real experts' interface and two of their layouts.

- `tiny_a`: UNI/Phikon-like timm ViT (32 px, patch 8, dim 48, 2 blocks): CLS + 4 x 4 patch tokens, ImageNet norm.
- `tiny_b`: CONCH-like (48 px, patch 16, dim 64 trunk + attentional pooling to 32-d, L2-normalised CLS; the two
  widths differ as in CONCH, 768 -> 512, so the pooler has CONCH's separate q/k/v projections),
  no patch tokens, OpenAI CLIP norm. Its input size differs from 32-px test crops, so `native` resizes.
Weights are a pure function of the seed (the global RNG is forked, not disturbed), so a teacher built twice,
on two workers or in a remote actor, gives the same targets. `load_weights` works as for the real experts.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from gpfm_scale.contracts.model_input import IMAGENET_MEAN, IMAGENET_STD
from gpfm_scale.models.config import Preprocessing
from gpfm_scale.models.experts.base import (
    EXPERTS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Expert,
    ExpertSpec,
)
from gpfm_scale.models.experts.conch import ConchVisual
from gpfm_scale.models.heads import l2_normalise
from gpfm_scale.models.vit import create_vit

TINY_B_TRUNK_DIM = 64
_NOTE = "random init from a fixed seed; for tests only"


def _tiny_vit(img_size: int, patch_size: int, dim: int, seed: int) -> VisionTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_vit(
            "vit_base_patch16_224",
            pretrained=False,
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=dim,
            depth=2,
            num_heads=2,
            num_classes=0,
            dynamic_img_size=True,
        )


@EXPERTS.register("tiny_a")
class TinyAExpert(Expert):
    spec = ExpertSpec("tiny_a", 48, 32, IMAGENET_MEAN, IMAGENET_STD, 8, True, _NOTE, needs_weights=False)
    model: VisionTransformer
    seed = 1234

    def __init__(self, preprocessing: Preprocessing = "gpfm_original") -> None:
        super().__init__(preprocessing)
        self.model = _tiny_vit(self.spec.input_size, self.spec.patch_size, self.spec.embed_dim, self.seed)
        self.freeze()

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        tokens = self.model.forward_features(x)
        return {"cls": tokens[:, 0], "patch": tokens[:, self.model.num_prefix_tokens :]}


@EXPERTS.register("tiny_b")
class TinyBExpert(Expert):
    spec = ExpertSpec("tiny_b", 32, 48, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 16, False, _NOTE, needs_weights=False)
    model: ConchVisual
    seed = 4321

    def __init__(self, preprocessing: Preprocessing = "gpfm_original") -> None:
        super().__init__(preprocessing)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            trunk = _tiny_vit(self.spec.input_size, self.spec.patch_size, TINY_B_TRUNK_DIM, self.seed)
            self.model = ConchVisual(trunk, out_dim=self.spec.embed_dim, pool_heads=2)
        self.freeze()

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {"cls": l2_normalise(self.model(x)), "patch": None}
