"""The exported teacher loads with plain timm (its own `local-dir:` loader, no network) and gives the teacher's CLS
features and the run's input contract."""

import json

import timm
import torch

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
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.teacher["backbone"](x)["cls"]
        got = plain.forward_features(x)[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert config["step"] == 7 and config["num_features"] == 64 == plain.num_features


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
    assert (config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"]) == ([0.7, 0.6, 0.5], [0.1, 0.2, 0.3])
    contract = describe_model(str(tmp_path), EmbedConfig()).contract
    assert (contract.size, contract.mean, contract.std) == (32, (0.7, 0.6, 0.5), (0.1, 0.2, 0.3))


def test_plain_timm_local_dir_rebuilds_our_loaders_model_and_input_contract_offline(tmp_path, monkeypatch):
    """What a timm user does with the export (timm/models/_factory.py `local-dir:` -> _hub.py
    `load_model_config_from_path`, then `timm.data.resolve_data_config`): the same model as our `load_exported`,
    bit for bit, and the run's size and (non-ImageNet) crops mean/std; with the hub offline nothing is fetched."""
    from gpfm_scale.contracts.export import load_exported
    from tests.integration.pretrain_helpers import tiny_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_cfg = tiny_config(**{"crops.mean": [0.7, 0.6, 0.5], "crops.std": [0.1, 0.2, 0.3],
                             "objective.model.experts": []})
    model = SSLMetaArch(run_cfg.objective).eval()
    with torch.no_grad():  # weights that differ from any initialisation timm could make
        for p in model.teacher.buffers():
            p.add_(torch.randn_like(p) * 0.01)
    export_teacher(model, run_cfg.objective.model.backbone, tmp_path, step=3, is_writer=True, crops=run_cfg.crops)
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    ours, _ = load_exported(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.forward_features(x), ours.forward_features(x))
    for loaded in (plain, ours):
        data = timm.data.resolve_data_config({}, model=loaded)
        assert tuple(data["input_size"]) == (3, 32, 32) and data["crop_pct"] == 1.0
        assert (tuple(data["mean"]), tuple(data["std"])) == ((0.7, 0.6, 0.5), (0.1, 0.2, 0.3))


def test_the_recipes_dinov2_arch_loads_from_the_export_not_its_registry_hub_weights(tmp_path, monkeypatch):
    """`vit_large_patch14_dinov2` (the recipe's arch) has an `hf_hub_id` in timm's registry cfg: the export's own
    `pretrained_cfg` replaces it, so `local-dir:` loads model.safetensors offline (a hub fetch would fail here)."""
    from safetensors.torch import save_file

    from gpfm_scale.contracts.export import export_config
    from gpfm_scale.models.config import BackboneConfig
    from gpfm_scale.models.vit import build_backbone, timm_create_kwargs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = BackboneConfig(arch="vit_large_patch14_dinov2", img_size=28, patch_size=14, embed_dim=32, depth=1,
                         num_heads=2, layerscale_init=1e-5)
    backbone = build_backbone(cfg).eval()
    save_file(backbone.export_state_dict(), str(tmp_path / "model.safetensors"))
    config = export_config(timm_create_kwargs(cfg), 32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), step=0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(plain.forward_features(x)[:, 0], backbone(x)["cls"])
    assert tuple(timm.data.resolve_data_config({}, model=plain)["input_size"]) == (3, 28, 28)
