"""Models of the GPFM objective, pure PyTorch + timm (no ray / deepspeed here).

- `config`: `BackboneConfig`, `HeadConfig`, `ExpertConfig`, `ModelConfig` (recipe defaults).
- `vit`: `build_backbone(cfg) -> Backbone` (timm ViT + iBOT mask token), `timm_create_kwargs(cfg)` for export.
- `heads`: `DinoHead`, `ExpertProjectionHead`, `build_dino_head`, `build_expert_head`.
- `experts`: `EXPERTS` registry, `Expert`, `ExpertSpec`, `build_expert(cfg)`.
- `losses`: the loss modules.
Only the configs are imported here, so importing a submodule does not pull in timm unless it needs it.
"""

from gpfm_scale.models.config import BackboneConfig, ExpertConfig, HeadConfig, ModelConfig, default_experts

__all__ = ["BackboneConfig", "ExpertConfig", "HeadConfig", "ModelConfig", "default_experts"]
