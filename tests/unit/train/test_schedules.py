"""Schedules at their anchor points (start, warm-up end, middle, end) for the recipe values, plus configs."""

from __future__ import annotations

import logging
import math

import pytest

from gpfm_scale.config import build_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.schedules import build_schedules

EPOCH = 1250
TOTAL = 500_000
PEAK = 4e-4 * math.sqrt(1536 / 1024)


@pytest.fixture(scope="module")
def sched():  # type: ignore[no-untyped-def]
    return build_schedules(ScheduleConfig(), total_batch=1536, total_iters=TOTAL)


def test_recipe_defaults() -> None:
    c = ScheduleConfig()
    assert (c.iters_per_epoch, c.base_lr, c.min_lr, c.warmup_epochs) == (1250, 4e-4, 1e-6, 40.0)
    assert (c.weight_decay, c.weight_decay_end, c.momentum_teacher, c.final_momentum_teacher) == (0.04, 0.4, 0.992, 1.0)
    assert (c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs) == (0.04, 0.07, 30.0)
    assert c.freeze_last_layer_epochs == 1.0
    o = OptimConfig()
    assert (o.betas, o.layerwise_decay, o.patch_embed_lr_mult, o.clip_grad) == ((0.9, 0.999), 0.9, 0.2, 3.0)
    with pytest.raises(ConfigError, match="lr_typo"):
        build_config(ScheduleConfig, {"lr_typo": 1})
    with pytest.raises(ConfigError, match="min_lr"):
        build_config(ScheduleConfig, {"min_lr": 1.0})


def test_lr_sqrt_scaling_warmup_and_cosine(sched) -> None:  # type: ignore[no-untyped-def]
    warm = 40 * EPOCH
    assert sched.peak_lr == pytest.approx(PEAK)
    assert sched.at(0).lr == 0.0
    assert sched.at(warm // 2).lr == pytest.approx(PEAK / 2)
    assert sched.at(warm).lr == pytest.approx(PEAK)
    assert sched.at((warm + TOTAL) // 2).lr == pytest.approx((PEAK + 1e-6) / 2)
    assert sched.at(TOTAL).lr == pytest.approx(1e-6)
    assert sched.at(TOTAL + 10).lr == pytest.approx(1e-6)


def test_weight_decay_and_momentum_cosines(sched) -> None:  # type: ignore[no-untyped-def]
    assert (sched.at(0).wd, sched.at(TOTAL // 2).wd, sched.at(TOTAL).wd) == pytest.approx((0.04, 0.22, 0.4))
    assert (sched.at(0).momentum, sched.at(TOTAL // 2).momentum) == pytest.approx((0.992, 0.996))
    assert sched.at(TOTAL).momentum == 1.0


def test_teacher_temperature_ramp(sched) -> None:  # type: ignore[no-untyped-def]
    temps = [sched.at(epoch * EPOCH).teacher_temp for epoch in (0, 15, 30, 100)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_last_layer_frozen_for_first_epoch(sched) -> None:  # type: ignore[no-untyped-def]
    assert sched.at(0).last_layer_lr == 0.0
    assert sched.at(EPOCH - 1).last_layer_lr == 0.0
    assert sched.at(EPOCH).lr > 0 and sched.at(EPOCH).last_layer_lr == sched.at(EPOCH).lr


def test_tiny_run_shorter_than_warmup_warns(caplog) -> None:  # type: ignore[no-untyped-def]
    cfg = ScheduleConfig(iters_per_epoch=1, lr_scaling="none")
    with caplog.at_level(logging.WARNING):
        short = build_schedules(cfg, total_batch=4, total_iters=10)
    assert "warm-up" in caplog.text
    assert short.at(4).lr == pytest.approx(4e-4 * 4 / 40)
    with pytest.raises(ConfigError):
        build_schedules(cfg, total_batch=0, total_iters=10)
