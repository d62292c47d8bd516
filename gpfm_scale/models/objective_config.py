"""Config of the whole GPFM objective (`SSLMetaArch`): the models, the loss weights and the teacher normalisation.

It composes the existing configs instead of repeating their fields: sizes and experts come from `ModelConfig`
(each expert's CLS/patch weights live on its `ExpertConfig`), the self-supervised weights from `LossWeights`.
What is new here is only what no other config holds: how the teacher's logits become targets (softmax centring
or Sinkhorn-Knopp), the student temperature and the centre momentum (recipe: 0.1 and 0.9), and KoLeo's epsilon.
The teacher temperature is a schedule (`ScheduleConfig`) and is passed to `forward` every step; the number of
local crops is read from the batch (`CropConfig.n_local`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpfm_scale.config import StrictModel
from gpfm_scale.models.config import ModelConfig
from gpfm_scale.models.losses.total import LossWeights

Centering = Literal["softmax", "sinkhorn"]


class ObjectiveConfig(StrictModel):
    """Student/teacher models + loss settings; defaults are the GPFM ViT-L/14 recipe (REFERENCE.md)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossWeights = Field(default_factory=LossWeights)
    centering: Centering = Field(
        "softmax", description="softmax: EMA centre + sharp softmax; sinkhorn: Sinkhorn-Knopp (bigger models)"
    )
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations (DINOv2: 3)")
    student_temp: float = Field(0.1, gt=0.0, description="temperature of the student softmax (DINO and iBOT)")
    center_momentum: float = Field(0.9, ge=0.0, le=1.0, description="EMA momentum of the softmax centres")
    koleo_eps: float = Field(1e-8, gt=0.0, description="KoLeo distance floor; rows below it are counted")
