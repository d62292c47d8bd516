"""Expert interface: registry, preprocessing numbers, frozen forward, strict weight loading (tiny experts)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from gpfm_scale.config import build_config
from gpfm_scale.errors import CheckpointMismatchError, ConfigError
from gpfm_scale.models.config import ExpertConfig, ModelConfig
from gpfm_scale.models.experts import EXPERTS, build_expert
from gpfm_scale.contracts.model_input import IMAGENET_MEAN, IMAGENET_STD
from gpfm_scale.models.experts.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from gpfm_scale.models.experts.tiny import TinyAExpert


def _crops(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8)


def test_registry_and_recipe_specs() -> None:
    assert EXPERTS.names() == ["conch", "phikon", "tiny_a", "tiny_b", "uni"]
    table = {n: EXPERTS.get(n).spec for n in ("uni", "phikon", "conch")}
    assert [(s.embed_dim, s.input_size, s.has_patch_tokens) for s in table.values()] == [
        (1024, 224, True), (768, 224, True), (512, 448, False)
    ]
    assert table["uni"].mean == (0.485, 0.456, 0.406) and table["phikon"].std == (0.229, 0.224, 0.225)
    assert table["conch"].mean == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)
    assert table["conch"].std == pytest.approx((0.2686, 0.2613, 0.2758), abs=1e-4)


def test_default_expert_configs_are_the_recipe() -> None:
    experts = ModelConfig().experts
    assert [(e.name, e.cls_weight, e.patch_weight, e.weights) for e in experts] == [
        ("uni", 1.0, 0.25, None), ("phikon", 0.5, 0.125, None), ("conch", 1.0, None, None)
    ]
    assert all(e.preprocessing == "gpfm_original" for e in experts)  # GPFM fed every expert the global crops


def test_preprocessing_of_a_constant_image_by_hand() -> None:
    expert = build_expert(ExpertConfig(name="tiny_b", preprocessing="native"))  # 48 px, OpenAI CLIP mean/std
    crops = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    x = expert.preprocess(crops)
    assert x.shape == (2, 3, 48, 48) and x.dtype == torch.float32
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for channel, (mean, std) in enumerate(zip(clip_mean, clip_std)):
        assert torch.allclose(x[:, channel], torch.full((2, 48, 48), (128 / 255 - mean) / std), atol=1e-5)


def test_gpfm_original_preprocessing_keeps_the_crops_and_uses_imagenet() -> None:
    expert = build_expert(ExpertConfig(name="tiny_b"))  # the default: GPFM's feed, whatever the expert's own
    crops = _crops(size=32)
    x = expert.preprocess(crops)
    assert x.shape == (2, 3, 32, 32)  # not tiny_b's native 48 px: the global crops as they are
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (crops / 255.0 - mean) / std, atol=1e-6)


@pytest.mark.parametrize(
    ("preprocessing", "size", "mean", "std"),
    [("gpfm_original", 224, IMAGENET_MEAN, IMAGENET_STD), ("native", 448, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)],
)
def test_conch_input_in_both_modes(preprocessing: str, size: int, mean: tuple, std: tuple) -> None:
    """The recipe's 224-px global crops reach CONCH at 224 px + ImageNet (GPFM) or at 448 px + CLIP (native)."""
    conch = EXPERTS.get("conch")(preprocessing=preprocessing)  # random init: only the input contract matters
    x = conch.preprocess(torch.full((1, 3, 224, 224), 200, dtype=torch.uint8))
    assert x.shape == (1, 3, size, size)
    expected = [(200 / 255 - m) / s for m, s in zip(mean, std)]
    assert torch.allclose(x[0, :, size // 2, size // 2], torch.tensor(expected), atol=1e-5)


def test_resize_is_clamped_like_a_uint8_image() -> None:
    expert = build_expert(ExpertConfig(name="tiny_b", preprocessing="native"))
    crops = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    crops[..., 16:] = 255  # a hard edge: bicubic over/undershoots unless clamped
    x = expert.preprocess(crops)
    mean = torch.tensor(expert.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(expert.spec.std).view(1, 3, 1, 1)
    pixels = x * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels.min() < 0.01 and pixels.max() > 0.99


def test_forward_is_frozen_and_stays_in_eval() -> None:
    expert = build_expert(ExpertConfig(name="tiny_a", patch_weight=0.5))
    expert.train()
    assert not expert.training and not any(m.training for m in expert.modules())
    assert not any(p.requires_grad for p in expert.parameters())
    with torch.enable_grad():
        out = expert(_crops())
    assert out["cls"].shape == (2, 48) and out["patch"].shape == (2, 16, 48)
    assert not out["cls"].requires_grad and out["cls"].grad_fn is None


def test_forward_resamples_patch_tokens_to_the_student_grid() -> None:
    expert = build_expert(ExpertConfig(name="tiny_a"))
    out = expert(_crops(), grid=(7, 7))
    assert out["patch"].shape == (2, 49, 48)
    assert build_expert(ExpertConfig(name="tiny_b"))(_crops(), grid=(7, 7))["patch"] is None


def test_tiny_experts_are_deterministic_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(7)
    reference = torch.rand(3)
    torch.manual_seed(7)
    first = TinyAExpert()
    after = torch.rand(3)
    second = TinyAExpert()
    assert torch.equal(reference, after)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_build_expert_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown expert 'gigapath'.*known: conch, phikon"):
        build_expert(ExpertConfig(name="gigapath"))
    with pytest.raises(ConfigError, match=r"experts\.uni\.weights: required.*MahmoodLab/UNI"):
        build_expert(ExpertConfig(name="uni"))
    with pytest.raises(ConfigError, match="conch has no patch tokens"):
        build_expert(ExpertConfig(name="conch", patch_weight=0.1, weights="/nonexistent"))
    with pytest.raises(ConfigError, match="listed more than once: tiny_a"):
        build_config(ModelConfig, {"experts": [{"name": "tiny_a"}, {"name": "tiny_a"}]})


def _perturbed_state(seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in TinyAExpert().model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_load_from_safetensors_and_torch_files(tmp_path, suffix: str) -> None:
    state = _perturbed_state()
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # wrapped, DDP-prefixed
    loaded = build_expert(ExpertConfig(name="tiny_a", weights=path))
    reference = TinyAExpert()
    reference.model.load_state_dict(state)
    crops = _crops()
    assert torch.allclose(loaded(crops)["cls"], reference(crops)["cls"], atol=1e-6)
    assert not torch.allclose(loaded(crops)["cls"], TinyAExpert()(crops)["cls"], atol=1e-3)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_missing_or_unreadable_file(tmp_path) -> None:
    with pytest.raises(CheckpointMismatchError, match="tiny_a: weights file not found: .*absent.bin"):
        build_expert(ExpertConfig(name="tiny_a", weights=tmp_path / "absent.bin"))
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": logging.getLogger("x")}, pickled)
    with pytest.raises(CheckpointMismatchError, match="cannot read weights file"):
        build_expert(ExpertConfig(name="tiny_a", weights=pickled))  # weights_only refuses arbitrary objects


def test_key_and_shape_mismatches_are_named(tmp_path) -> None:
    state = _perturbed_state()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    state["head.weight"] = torch.zeros(2, 48)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as err:
        build_expert(ExpertConfig(name="tiny_a", weights=path))
    message = str(err.value)
    assert "missing 1: blocks.1.mlp.fc2.bias" in message
    assert "unexpected 1: head.weight" in message
    assert "wrong shape 1: blocks.0.attn.qkv.weight (file [3, 3], model [144, 48])" in message
