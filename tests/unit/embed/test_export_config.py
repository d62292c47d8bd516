"""A tampered export config.json is refused by name before timm sees it: no download, no silent input size."""

from __future__ import annotations

import json
import shutil

import pytest

from gpfm_scale.config import apply_overrides, build_config, read_yaml
from gpfm_scale.contracts.export import load_exported
from gpfm_scale.data.config import CropConfig
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.models import describe_model
from gpfm_scale.errors import ConfigError


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny teacher exported as `gpfm-scale pretrain` does (32 px, patch 8: a 4 x 4 grid)."""
    from gpfm_scale.models.meta_arch import SSLMetaArch
    from gpfm_scale.models.objective_config import ObjectiveConfig
    from gpfm_scale.train.checkpoint import export_teacher
    from tests.integration.pretrain_helpers import TINY_YAML

    cfg = build_config(ObjectiveConfig, apply_overrides(read_yaml(TINY_YAML)["objective"], {"model.experts": []}))
    directory = tmp_path_factory.mktemp("run") / "export"
    export_teacher(SSLMetaArch(cfg).eval(), cfg.model.backbone, directory, step=1, is_writer=True, crops=CropConfig())
    return directory


def _tampered(export, tmp_path, edit) -> str:
    directory = tmp_path / "export"
    shutil.copytree(export, directory)
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_the_untampered_export_passes(export):
    info = describe_model(str(export), EmbedConfig())
    assert info.contract.size == 32 and info.dim == 64
    model, config = load_exported(export)
    assert config["img_size"] == 32 and config["timm"]["pretrained"] is False


def _set(path: str, value):
    def edit(config: dict) -> None:
        *parents, key = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[key] = value
    return edit


def _drop(key: str):
    return lambda config: config.pop(key)


TAMPERED = [
    (_set("timm.pretrained", True), "timm.pretrained"),  # would make every actor try to download
    (_set("timm.model_name", "hf-hub:timm/vit_small_patch16_224"), "timm.model_name"),
    (_set("timm.checkpoint_path", "/tmp/other.pth"), "timm.checkpoint_path"),  # keys outside the schema
    (_set("timm.pretrained_cfg_overlay", {"hf_hub_id": "x/y"}), "timm.pretrained_cfg_overlay"),
    (_set("extra", 1), "extra"),
    (_set("img_size", 64), "img_size"),  # input contract no longer the model's
    (lambda c: (_set("img_size", 64)(c), _set("timm.img_size", 64)(c)), "img_size 64 does not match"),  # grid
    (_set("patch_size", 16), "patch_size"),
    (_set("std", [0.2, 0.0, 0.2]), "std"),
    (_drop("mean"), "mean"),
]


@pytest.mark.parametrize(("edit", "named"), TAMPERED)
def test_tampered_config_is_refused_naming_the_key(export, tmp_path, edit, named):
    directory = _tampered(export, tmp_path, edit)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        describe_model(directory, EmbedConfig())
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_exported(directory)


def test_a_config_that_is_not_json_or_weights_that_are_not_safetensors_are_refused(export, tmp_path):
    directory = _tampered(export, tmp_path, lambda c: None)
    (tmp_path / "export" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        describe_model(directory, EmbedConfig())
    shutil.copy(export / "config.json", tmp_path / "export" / "config.json")
    (tmp_path / "export" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="safetensors"):
        describe_model(directory, EmbedConfig())
