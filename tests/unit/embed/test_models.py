"""The three kinds of --model: their features equal a hand-written forward, their input contracts, their refusals."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from gpfm_scale.config import apply_overrides, build_config, read_yaml
from gpfm_scale.data.config import CropConfig
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.models import describe_model, load_model
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.models.experts import build_expert

TINY_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def _uint8(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_expert_features_are_the_experts_cls():
    model, contract = load_model("expert:tiny_a", EmbedConfig())
    assert (contract.size, contract.mean) == (32, (0.485, 0.456, 0.406))
    x = _uint8(3, 32)
    expected = build_expert(ExpertConfig(name="tiny_a"))(x)["cls"]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_real_experts_and_unknown_names_refuse_without_weights(tmp_path):
    with pytest.raises(ConfigError, match="uni.*local weight file"):
        describe_model("expert:uni", EmbedConfig())
    with pytest.raises(ConfigError, match="weights file not found"):
        describe_model(f"expert:uni={tmp_path / 'missing.bin'}", EmbedConfig())
    with pytest.raises(ConfigError, match="nope"):
        describe_model("expert:nope", EmbedConfig())
    with pytest.raises(ConfigError, match="not an exported teacher"):
        describe_model(str(tmp_path), EmbedConfig())


def test_timm_without_weights_refuses_unless_random_init_is_allowed():
    with pytest.raises(ConfigError, match="allow_random_init"):
        describe_model("timm:vit_small_patch16_224", EmbedConfig())
    info = describe_model("timm:vit_small_patch16_224", EmbedConfig(allow_random_init=True))
    assert info.name == "timm:vit_small_patch16_224(random)" and info.dim == 384 and info.contract.size == 224


def test_timm_with_local_weights_loads_them_strictly(tmp_path):
    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=5, **TINY_TIMM).eval()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))  # with a 5-class head: dropped on load
    cfg = EmbedConfig(weights=tmp_path / "w.safetensors", timm_kwargs=TINY_TIMM)
    model, contract = load_model("timm:vit_small_patch16_224", cfg)
    assert contract.size == 32 and contract.mean == (0.5, 0.5, 0.5)
    x = _uint8(2, 32, seed=1)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features((x.float() / 255 - 0.5) / 0.5), pre_logits=True)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert describe_model("timm:vit_small_patch16_224", cfg).fingerprint != "random-init"


def test_exported_teacher_features_are_its_normalised_cls(tmp_path):
    from gpfm_scale.models.meta_arch import SSLMetaArch
    from gpfm_scale.models.objective_config import ObjectiveConfig
    from gpfm_scale.train.checkpoint import export_teacher
    from tests.integration.pretrain_helpers import TINY_YAML

    cfg = build_config(ObjectiveConfig, apply_overrides(read_yaml(TINY_YAML)["objective"], {"model.experts": []}))
    arch = SSLMetaArch(cfg).eval()
    export_teacher(arch, cfg.model.backbone, tmp_path / "run" / "export", step=3, is_writer=True, crops=CropConfig())
    model, contract = load_model(str(tmp_path / "run" / "export"), EmbedConfig())
    info = describe_model(str(tmp_path / "run" / "export"), EmbedConfig())
    assert info.name == "teacher:run@step3" and info.dim == 64 and contract.size == 32
    x = _uint8(2, 32, seed=2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = arch.teacher["backbone"]((x.float() / 255 - mean) / std)["cls"]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
