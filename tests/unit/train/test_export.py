"""The exported teacher loads with plain timm + safetensors and gives the teacher's CLS features."""

import json

import timm
import torch
from safetensors.torch import load_file

from gpfm_scale.config import apply_overrides, build_config, read_yaml
from gpfm_scale.data.config import CropConfig
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.checkpoint import export_teacher
from tests.integration.pretrain_helpers import TINY_YAML


def test_exported_teacher_equals_the_teacher(tmp_path):
    cfg = build_config(ObjectiveConfig, apply_overrides(read_yaml(TINY_YAML)["objective"], {"model.experts": []}))
    model = SSLMetaArch(cfg).eval()
    with torch.no_grad():  # make the teacher differ from its initialisation
        for p in model.teacher.buffers():
            p.add_(torch.randn_like(p) * 0.01)
    export_teacher(model, cfg.model.backbone, tmp_path, step=7, is_writer=True, crops=CropConfig())
    config = json.loads((tmp_path / "config.json").read_text())
    plain = timm.create_model(**config["timm"]).eval()
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.teacher["backbone"](x)["cls"]
        got = plain.forward_features(x)[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert config["step"] == 7 and config["embed_dim"] == 64


def test_export_input_contract_follows_the_runs_crop_normalisation(tmp_path):
    """A run trained on crops normalised with a non-ImageNet mean/std exports that mean/std, and `embed` feeds the
    teacher with it (the config.json once said ImageNet whatever `crops.mean` was)."""
    from gpfm_scale.embed.config import EmbedConfig
    from gpfm_scale.embed.models import describe_model
    from tests.integration.pretrain_helpers import tiny_config

    run_cfg = tiny_config(**{"crops.mean": [0.7, 0.6, 0.5], "crops.std": [0.1, 0.2, 0.3],
                             "objective.model.experts": []})
    model = SSLMetaArch(run_cfg.objective).eval()
    export_teacher(model, run_cfg.objective.model.backbone, tmp_path, step=1, is_writer=True, crops=run_cfg.crops)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["mean"], config["std"]) == ([0.7, 0.6, 0.5], [0.1, 0.2, 0.3])
    contract = describe_model(str(tmp_path), EmbedConfig()).contract
    assert (contract.size, contract.mean, contract.std) == (32, (0.7, 0.6, 0.5), (0.1, 0.2, 0.3))
