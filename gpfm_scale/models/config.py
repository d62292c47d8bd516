"""Configs of the models: the student/teacher backbone, the DINO/iBOT head and the frozen experts.

Defaults are the GPFM ViT-L/14 distillation recipe (REFERENCE.md, "Backbone and heads" and the expert table);
tiny test configs override sizes (`embed_dim`, `depth`, `num_heads`, `img_size`, `patch_size`), never the
structure.

Why `vit_large_patch14_dinov2` (timm) is the default `arch`: it is timm's entry for exactly DINOv2's ViT-L/14,
which GPFM trains: 24 blocks, dim 1024, 16 heads, MLP FFN (GELU, ratio 4), LayerScale with init 1e-5 built in,
qkv bias, CLS token and no register tokens (`..._dinov2_reg4` has them), and its `checkpoint_filter_fn` maps the
original DINOv2 weights. `vit_large_patch14_224` with `init_values=1e-5` builds the same modules; the dinov2 name
documents the lineage. Its registered default image size is 518 px; we always pass `img_size` (224), so the
position embedding is 1 + 16 x 16 = 257 tokens and the 98-px local crops (7 x 7 patches) interpolate from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from gpfm_scale.config import StrictModel


class BackboneConfig(StrictModel):
    """The student/teacher ViT, built with `timm.create_model(arch, pretrained=False, ...)`."""

    arch: str = "vit_large_patch14_dinov2"
    img_size: int = Field(224, gt=0, description="global crop size (px) the position embedding is made for")
    patch_size: int = Field(14, gt=0, description="px per patch side")
    embed_dim: int | None = Field(None, gt=0, description="override of the arch's width (tiny test models)")
    depth: int | None = Field(None, gt=0, description="override of the arch's number of blocks")
    num_heads: int | None = Field(None, gt=0, description="override of the arch's number of heads")
    drop_path_rate: float = Field(0.4, ge=0.0, lt=1.0, description="stochastic depth per residual branch")
    drop_path_uniform: bool = Field(True, description="same rate in every block (DINOv2 ViT-L); else 0 -> rate")
    layerscale_init: float | None = Field(1e-5, gt=0.0, description="LayerScale init; None disables LayerScale")
    grad_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in the student's backward (one more student forward, "
        "~+33% of its fwd+bwd FLOPs); needed for ViT-L at 96-128 images per GPU (docs/scaling.md)",
    )

    @model_validator(mode="after")
    def _grid_fits(self) -> BackboneConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        return self

    @property
    def grid_size(self) -> int:
        """Patches per side at `img_size` (16 for ViT-L/14 at 224 px)."""
        return self.img_size // self.patch_size


class HeadConfig(StrictModel):
    """DINO head (shared with iBOT in the ViT-L recipe): MLP in -> hidden -> hidden -> bottleneck, then prototypes."""

    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    num_prototypes: int = Field(65536, gt=0)
    num_layers: int = Field(3, ge=1)
    shared_ibot_head: bool = True
    fix_last_layer_norm: bool = Field(
        False,
        description="keep the weight-norm gain g of the last layer at 1 (DINO v1); False (GPFM, DINOv2): g starts "
        "at 1 and is trained once the last layer is unfrozen",
    )
    expert_bottleneck_dim: int = Field(256, gt=0, description="bottleneck of each expert projection head")


# gpfm_original: the teacher's global crops as they are (224 px in the recipe), ImageNet mean/std, for every expert,
# as GPFM's code did (ssl_meta_arch.py feeds `global_crops` to UNI, Phikon and CONCH alike). native: each expert's
# own input size and mean/std (CONCH: 448 px, OpenAI CLIP statistics), an opt-in variant that changes CONCH's
# targets and costs ~60% more expert FLOPs (docs/scaling.md).
Preprocessing = Literal["gpfm_original", "native"]


class ExpertConfig(StrictModel):
    """One frozen expert to distil from. `patch_weight=None` means no patch-token loss for it."""

    name: str
    weights: Path | None = Field(
        None, description="local weight file (.safetensors/.bin/.pth); required for real experts"
    )
    cls_weight: float = Field(1.0, ge=0.0)
    patch_weight: float | None = Field(None, ge=0.0)
    preprocessing: Preprocessing = Field(
        "gpfm_original",
        description="gpfm_original (GPFM): the global crops as they are (224 px) + ImageNet mean/std; "
        "native: the expert's own input size and mean/std (CONCH: 448 px + CLIP)",
    )


def default_experts() -> list[ExpertConfig]:
    """The recipe's three experts (REFERENCE.md expert table); weights must be set before they can be built."""
    return [
        ExpertConfig(name="uni", cls_weight=1.0, patch_weight=0.25),
        ExpertConfig(name="phikon", cls_weight=0.5, patch_weight=0.125),
        ExpertConfig(name="conch", cls_weight=1.0, patch_weight=None),
    ]


class ModelConfig(StrictModel):
    """Everything `models/` builds for one SSL run: backbone, DINO/iBOT head and the experts."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    experts: list[ExpertConfig] = Field(default_factory=default_experts)

    @model_validator(mode="after")
    def _unique_experts(self) -> ModelConfig:
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"experts listed more than once: {', '.join(dupes)}")
        return self
