"""benchmarks/bench_objective.py times the trainers' own `train_step`, clipped to its config's `clip_grad`.

The benchmark used to clip to a hard-coded 3.0 whatever the config said. Two benchmark steps from the same
initialisation and batch, one with the recipe's 3.0 and one with a limit far below the gradients' norms: the step
must report the limit it clipped to, the same pre-clip norms, and the tightly clipped backbone must barely move
(AdamW normalises the step by the gradient's size, so only a gradient shrunk below AdamW's eps (1e-8) moves the
weights less: a limit of 1e-10 does that, 3.0 does not).
"""

from __future__ import annotations

import pytest
import torch

from gpfm_scale.train.config import OptimConfig

from tests.benchmark_scripts import import_benchmark



def _backbone_shift(bench, clip: float) -> tuple[float, dict[str, float]]:
    preset = bench.tiny_preset(batch=4)
    preset = type(preset)(preset.objective, preset.crop, preset.batch, preset.tile_px, OptimConfig(clip_grad=clip))
    step = bench.Step(preset, torch.device("cpu"), grad_checkpointing=False)
    before = [p.detach().clone() for p in step.model.student["backbone"].parameters()]
    result = step.run()
    assert result.clip_grad == clip
    after = step.model.student["backbone"].parameters()
    shift = max(float((a.detach() - b).abs().max()) for a, b in zip(after, before))
    return shift, {k: float(v) for k, v in result.grad_norms.items()}


def test_the_benchmark_step_clips_to_the_configured_limit() -> None:
    bench_objective = import_benchmark("bench_objective")

    recipe_shift, recipe_norms = _backbone_shift(bench_objective, 3.0)
    tight_shift, tight_norms = _backbone_shift(bench_objective, 1e-10)
    assert tight_norms == pytest.approx(recipe_norms)  # same model and batch: only the clipping differs
    assert min(recipe_norms.values()) > 1e-6  # far above the tight limit
    assert tight_shift < 0.1 * recipe_shift
