"""The DeepSpeed config: DeepSpeed's global clipping off (we clip per module), bf16 refused without ZeRO."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gpfm_scale.errors import ConfigError
from gpfm_scale.train.engine import DeepSpeedConfig, deepspeed_config


def test_deepspeed_never_clips_and_bf16_is_enabled_on_gpu_by_default() -> None:
    out = deepspeed_config(DeepSpeedConfig(zero_stage=2), micro_batch=4, on_gpu=True)
    assert out["gradient_clipping"] == 0.0 and out["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(DeepSpeedConfig(zero_stage=0), micro_batch=4, on_gpu=False)


def test_bf16_without_zero_is_refused_with_a_reason() -> None:
    with pytest.raises(ValidationError, match="fp32 master"):
        DeepSpeedConfig(zero_stage=0, precision="bf16")
    with pytest.raises(ConfigError, match="zero_stage 1"):  # "auto" resolves to bf16 on a GPU
        deepspeed_config(DeepSpeedConfig(zero_stage=0), micro_batch=4, on_gpu=True)
