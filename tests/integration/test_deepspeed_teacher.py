"""The EMA teacher stays fp32 and follows the optimiser's fp32 master weights under DeepSpeed bf16, ZeRO-1/2/3.

DeepSpeed's bf16 mode casts the wrapped module's parameters to bf16; with momentum near 1 a bf16 teacher rounds
most of each update (1 - m)(s - t) away. Here, on one rank, three bf16 steps must leave every teacher tensor fp32
and equal to an fp64 EMA of the student's fp32 master weights read from DeepSpeed's public accessor; a DeepSpeed
checkpoint must restore the teacher bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from gpfm_scale.train.checkpoint import load_training_state, save_training_state
from gpfm_scale.train.engine import DeepSpeedConfig, deepspeed_config, fp32_master
from tests.integration.deepspeed_helpers import TEACHER_TEMP, build_engine, single_rank_group, tiny_batch, tiny_model

MOMENTUM = 0.995  # the recipe's range: (1 - m) * (s - t) is below bf16's resolution for most elements
STEPS = 3


def _master(param: torch.Tensor) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param).double()


@pytest.fixture(scope="module", autouse=True)
def _one_rank():
    with single_rank_group():
        yield


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_teacher_is_an_fp32_ema_of_the_fp32_master_weights(stage: int, tmp_path) -> None:
    model = tiny_model(experts=False)
    pairs = model.teacher_student_param_pairs()
    reference = {name: t.double().clone() for name, t, _ in pairs}
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-2)
    engine = build_engine(model, optimizer, deepspeed_config(DeepSpeedConfig(zero_stage=stage, precision="bf16"),
                                                             micro_batch=2, on_gpu=False))
    assert model.student_dtype == torch.bfloat16  # DeepSpeed did cast the student
    for step in range(STEPS):
        batch, _ = tiny_batch(step, experts=False)
        out = engine(batch, None, teacher_temp=TEACHER_TEMP, with_health=False)
        engine.backward(out["total"])
        engine.step()
        model.update_teacher(MOMENTUM, fp32_master)
        for name, _, student in pairs:
            reference[name] = MOMENTUM * reference[name] + (1 - MOMENTUM) * _master(student)

    assert list(model.teacher.parameters()) == []
    assert all(t.dtype == torch.float32 for t in model.teacher.buffers())
    moved = 0.0
    for name, teacher, _ in pairs:
        error = float((teacher.double() - reference[name]).norm() / reference[name].norm().clamp(min=1e-12))
        assert error < 1e-6, (name, error)
        moved = max(moved, float((reference[name] - teacher.double()).abs().max()))
    initial = tiny_model(experts=False).teacher_student_param_pairs()
    shift = max(float((t - t0).abs().max()) for (_, t, _), (_, t0, _) in zip(pairs, initial))
    assert shift > 1e-5  # the teacher did move, by amounts a bf16 tensor could not hold

    saved = {name: t.clone() for name, t, _ in pairs}
    save_training_state(engine, tmp_path, step=STEPS)
    for _, teacher, _ in pairs:
        teacher.add_(1.0)
    assert load_training_state(engine, tmp_path) == STEPS
    for name, teacher, _ in model.teacher_student_param_pairs():
        assert teacher.dtype == torch.float32 and torch.equal(teacher, saved[name]), name
