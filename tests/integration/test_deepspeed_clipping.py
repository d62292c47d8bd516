"""Per-module gradient clipping under DeepSpeed ZeRO 0-3 equals DINOv2's, computed in plain torch.

DINOv2 (and GPFM) clip the backbone and the DINO head each by its own norm and never clip the expert projection
heads. Reference: the same model, batch and loss in one process, `clip_grad_norm_` on the backbone's and the DINO
head's parameters separately, one SGD step (SGD, because Adam's first step hides a uniform gradient scale). The
DeepSpeed run (fp32, one rank) clips with `clip_grad_norms` between backward and step, DeepSpeed's own global
clipping off; every student parameter after the step must match. The loss is scaled so that all three gradient
norms are far above the limit: one global clip would shrink the backbone's step and the expert head's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gpfm_scale.train.engine import DeepSpeedConfig, clip_grad_norms, deepspeed_config, fp32_master
from tests.integration.deepspeed_helpers import TEACHER_TEMP, build_engine, single_rank_group, tiny_batch, tiny_model

CLIP, LR, LOSS_SCALE = 3.0, 0.05, 300.0


@pytest.fixture(scope="module", autouse=True)
def _one_rank():
    with single_rank_group():
        yield


def _reference(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Parameters after one plain-torch step (DINOv2's clipping), and the pre-clip norms by module."""
    optimizer = torch.optim.SGD(model.student.parameters(), lr=LR)
    batch, targets = tiny_batch(0, experts=True)
    out = model(batch, targets, teacher_temp=TEACHER_TEMP, with_health=False)
    (out["total"] * LOSS_SCALE).backward()
    norms = {name: float(nn.utils.clip_grad_norm_(model.student[name].parameters(), CLIP))
             for name in ("backbone", "dino_head")}
    norms["expert_heads"] = float(nn.utils.get_total_norm([p.grad for p in model.student["expert_heads"].parameters()]))
    optimizer.step()
    return {n: p.detach().clone() for n, p in model.student.named_parameters()}, norms


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_backbone_and_dino_head_are_clipped_separately_and_expert_heads_not(stage: int) -> None:
    model = tiny_model(experts=True)
    expected, ref_norms = _reference(copy.deepcopy(model))
    assert min(ref_norms.values()) > 3 * CLIP  # clipping bites on both modules; the expert head would be clipped too
    optimizer = torch.optim.SGD(model.student.parameters(), lr=LR)
    ds_config = deepspeed_config(DeepSpeedConfig(zero_stage=stage, precision="fp32"), micro_batch=2, on_gpu=False)
    assert ds_config["gradient_clipping"] == 0.0
    engine = build_engine(model, optimizer, {**ds_config, "zero_allow_untested_optimizer": True})
    batch, targets = tiny_batch(0, experts=True)
    out = engine(batch, targets, teacher_temp=TEACHER_TEMP, with_health=False)
    engine.backward(out["total"] * LOSS_SCALE)
    norms = clip_grad_norms(model.clipped_modules(), CLIP, partitioned=engine.zero_optimization_stage() > 0)
    engine.step()

    assert set(norms) == {"backbone", "dino_head"}
    for name in norms:
        assert float(norms[name]) == pytest.approx(ref_norms[name], rel=1e-5)
    for name, param in model.student.named_parameters():
        torch.testing.assert_close(fp32_master(param), expected[name], rtol=1e-6, atol=1e-6, msg=name)
