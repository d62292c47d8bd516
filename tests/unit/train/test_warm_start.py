"""Warm start (`init`): phase 2 starts bitwise from phase 1's export or a DINOv2/timm file; strict, never at resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.errors import CheckpointMismatchError, ConfigError
from gpfm_scale.models.config import BackboneConfig, ExpertConfig, HeadConfig, ModelConfig
from gpfm_scale.models.experts.tiny import TinyAExpert
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.checkpoint import export_teacher
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.local import train_local
from gpfm_scale.train.warm_start import InitConfig, apply_init, init_unless_resuming

DIM, DEPTH = 32, 2


def _cfg(experts: list[ExpertConfig] | None = None, shared_head: bool = True) -> ObjectiveConfig:
    backbone = BackboneConfig(img_size=32, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=2, drop_path_rate=0.1)
    head = HeadConfig(hidden_dim=48, bottleneck_dim=16, num_prototypes=64, expert_bottleneck_dim=16,
                      shared_ibot_head=shared_head)
    return ObjectiveConfig(model=ModelConfig(backbone=backbone, head=head, experts=experts or []))


def _model(seed: int, **kwargs) -> SSLMetaArch:
    torch.manual_seed(seed)
    model = SSLMetaArch(_cfg(**kwargs))
    with torch.no_grad():  # a phase-1 result: every teacher tensor away from its init, mask token included
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def phase1(tmp_path: Path) -> tuple[SSLMetaArch, Path]:
    model = _model(seed=0)
    export_teacher(model, model.cfg.model.backbone, tmp_path / "export", step=250, is_writer=True, crops=CropConfig())
    return model, tmp_path / "export"


def test_a_run_from_an_export_starts_with_teacher_and_student_bitwise_equal_to_it(phase1, tmp_path: Path) -> None:
    phase1_model, export = phase1
    exported = load_file(str(export / "model.safetensors"))
    experts = [ExpertConfig(name="tiny_a", cls_weight=1.0, patch_weight=0.25)]
    torch.manual_seed(1)
    phase2 = SSLMetaArch(_cfg(experts))
    fresh_heads = {k: v.clone() for k, v in phase2.student["dino_head"].state_dict().items()}
    fresh_expert_heads = {k: v.clone() for k, v in phase2.student["expert_heads"].state_dict().items()}
    apply_init(phase2, InitConfig(weights=export))
    for side in (phase2.teacher, phase2.student):
        assert _equal(side["backbone"].vit.state_dict(), exported)
        assert torch.equal(side["backbone"].mask_token, phase1_model.teacher["backbone"].mask_token)
        assert _equal(side["dino_head"].state_dict(), fresh_heads)  # init.heads false: GPFM's heads start fresh
    assert _equal(phase2.student["expert_heads"].state_dict(), fresh_expert_heads)

    # the trainer itself: with the teacher momentum held at 1, the teacher after a real step is still the export
    schedule = ScheduleConfig(iters_per_epoch=2, warmup_epochs=0.0, warmup_teacher_temp_epochs=0.5,
                              freeze_last_layer_epochs=0.0, momentum_teacher=1.0, final_momentum_teacher=1.0)
    tiles = torch.randint(0, 256, (8, 3, 48, 48), dtype=torch.uint8)
    run = train_local(_cfg(experts), OptimConfig(), schedule, CropConfig(global_size=32, local_size=16, n_local=2,
                      blur_kernel=3), MaskConfig(min_num_patches=2), tiles, steps=2, batch_size=4, seed=5,
                      experts={"tiny_a": TinyAExpert()}, init=InitConfig(weights=export, heads=True))
    assert torch.isfinite(torch.tensor(run.history[0]["total"]))
    assert _equal(run.model.teacher["backbone"].vit.state_dict(), exported)
    assert _equal(run.model.teacher["dino_head"].state_dict(), phase1_model.teacher["dino_head"].state_dict())
    assert not _equal(run.model.student["backbone"].vit.state_dict(), exported)  # and the student trained


def test_heads_load_with_init_heads(phase1) -> None:
    phase1_model, export = phase1
    phase2 = _model(seed=1)
    apply_init(phase2, InitConfig(weights=export, heads=True))
    for side in (phase2.teacher, phase2.student):
        assert _equal(side["dino_head"].state_dict(), phase1_model.teacher["dino_head"].state_dict())


def test_resume_never_reads_the_init() -> None:
    model, missing = _model(seed=0), InitConfig(weights=Path("/nonexistent/phase1/export"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_unless_resuming(model, missing, resuming=True)
    assert _equal(model.state_dict(), before)
    with pytest.raises(ConfigError, match="init.weights: not found: /nonexistent/phase1/export"):
        init_unless_resuming(model, missing, resuming=False)


def test_a_foreign_file_is_refused_naming_the_keys_and_leaves_the_model_as_built(tmp_path: Path) -> None:
    model = _model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    uni_like = tmp_path / "tiny_a.safetensors"  # a ViT of another width and patch grid (an expert's weights)
    save_file({k: v.contiguous() for k, v in TinyAExpert().model.state_dict().items()}, str(uni_like))
    with pytest.raises(CheckpointMismatchError) as err:
        apply_init(model, InitConfig(weights=uni_like))
    message = str(err.value)
    assert "(timm) does not match the model" in message
    assert "missing 4: vit.blocks.0.ls1.gamma" in message  # the expert has no LayerScale
    assert "wrong shape 30: " in message and "vit.blocks.0.attn.qkv.weight (file [144, 48], model [96, 32])" in message
    resnet = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(2, 8)}}, resnet)
    with pytest.raises(CheckpointMismatchError, match=r"missing \d+: .*vit\.blocks\.0\..*unexpected 2: "
                                                      r"vit\.conv1\.weight, vit\.fc\.weight"):
        apply_init(model, InitConfig(weights=resnet, format="timm"))
    assert _equal(model.state_dict(), before)


def _dinov2_names(model: SSLMetaArch, chunks: int) -> dict[str, torch.Tensor]:
    """The teacher as a DINOv2 training checkpoint names it (written out by hand, independently of the map)."""
    out = {}
    for key, value in model.teacher["backbone"].vit.state_dict().items():
        block = re.match(r"blocks\.(\d+)\.(.*)", key)
        if block:  # FSDP block chunks: blocks.{chunk}.{global index}
            i = int(block.group(1))
            key = f"blocks.{i * chunks // DEPTH}.{i}.{block.group(2)}"
        out[f"backbone.{key}"] = value.clone()
    out["backbone.mask_token"] = model.teacher["backbone"].mask_token.detach().reshape(1, DIM).clone()
    for key, value in model.teacher["dino_head"].state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        out[f"dino_head.{key}"] = value.clone()
    return out


def test_a_dinov2_training_checkpoint_maps_onto_our_names(tmp_path: Path) -> None:
    phase1_model = _model(seed=0)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": _dinov2_names(phase1_model, chunks=2), "iteration": 250_000 - 1}, path)
    phase2 = _model(seed=1)
    apply_init(phase2, InitConfig(weights=path, heads=True))  # format auto -> dinov2
    for side in (phase2.teacher, phase2.student):
        for part in ("backbone", "dino_head"):
            assert _equal(side[part].state_dict(), phase1_model.teacher[part].state_dict()), part


def test_a_dinov2_hub_backbone_with_a_larger_grid_is_resampled(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed

    phase1_model = _model(seed=0)
    hub = {k.removeprefix("backbone."): v for k, v in _dinov2_names(phase1_model, chunks=1).items()
           if k.startswith("backbone.")}
    hub = {re.sub(r"^blocks\.0\.(\d+)\.", r"blocks.\1.", k): v for k, v in hub.items()}  # hub files: no chunks
    hub["pos_embed"] = torch.randn(1, 1 + 8 * 8, DIM)  # made for a larger image, as DINOv2's 518-px hub models
    path = tmp_path / "dinov2_vits_hub.pth"
    torch.save(hub, path)
    phase2 = _model(seed=1)
    apply_init(phase2, InitConfig(weights=path, format="dinov2"))
    expected = resample_abs_pos_embed(hub["pos_embed"], new_size=[4, 4], old_size=[8, 8], num_prefix_tokens=1)
    assert torch.equal(phase2.student["backbone"].vit.pos_embed, expected)
    assert torch.equal(phase2.teacher["backbone"].vit.blocks[1].attn.qkv.weight, hub["blocks.1.attn.qkv.weight"])
    assert torch.equal(phase2.teacher["backbone"].mask_token.flatten(), hub["mask_token"].flatten())


def test_format_must_fit_the_path(phase1, tmp_path: Path) -> None:
    _, export = phase1
    with pytest.raises(ConfigError, match="is a directory"):
        apply_init(_model(seed=1), InitConfig(weights=export, format="dinov2"))
    with pytest.raises(ConfigError, match="not a `gpfm-scale pretrain` export"):
        apply_init(_model(seed=1), InitConfig(weights=tmp_path))
