"""The multi-crop recipe is written once (`crop_recipe.CropRecipe`) and both loader backends read it: sizes,
areas and counts of their crops follow the recipe, not copies of it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.crop_recipe import CropKind, CropRecipe
from gpfm_scale.data.loader import build_loader
from gpfm_scale.data.loader_config import LoaderConfig
from tests.unit.data.shard_helpers import decode_jpeg, make_shards

TILE = 48  # make_shards' tile side (px)
BATCH = 4


def test_recipe_reads_every_crop_setting_of_the_config():
    cfg = CropConfig(global_size=40, global_scale=(0.4, 0.9), local_size=20, local_scale=(0.1, 0.2), n_local=3,
                     crop_ratio=(0.8, 1.25), hflip_p=0.1, vflip_p=0.2, rot90_p=0.3, hed_jitter_p=0.4, jitter_p=0.5,
                     grayscale_p=0.6, blur_probabilities=(0.7, 0.8, 0.9), solarize_p_global2=0.25)
    recipe = CropRecipe.from_config(cfg)
    common = dict(ratio=(0.8, 1.25), hflip_p=0.1, vflip_p=0.2, rot90_p=0.3, hed_jitter_p=0.4, jitter_p=0.5,
                  grayscale_p=0.6)
    assert recipe.global_crops == (CropKind(40, (0.4, 0.9), blur_p=0.7, solarize_p=0.0, **common),
                                   CropKind(40, (0.4, 0.9), blur_p=0.8, solarize_p=0.25, **common))
    assert recipe.local_crops == (CropKind(20, (0.1, 0.2), blur_p=0.9, solarize_p=0.0, **common),) * 3
    assert recipe.crops == recipe.global_crops + recipe.local_crops
    assert CropRecipe.from_config(CropConfig(n_local=0)).local_crops == ()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("recipe"), 1, BATCH)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_backends_take_sizes_areas_and_counts_from_the_recipe(shards, backend, monkeypatch):
    """A recipe other than the config's (whole-tile global crops at the tile's size, 3 local crops of 24 px;
    the config says 5% crops of 32 px and 2 locals of 16 px): each backend's batch follows the recipe."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    paths, jpgs = shards
    whole = CropKind(size=TILE, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, vflip_p=0.0, rot90_p=0.0,
                     hed_jitter_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    recipe = CropRecipe(global_crops=(whole, whole), local_crops=(replace(whole, size=24),) * 3)
    monkeypatch.setattr(CropRecipe, "from_config", classmethod(lambda cls, cfg: recipe))
    crops = CropConfig(global_size=32, global_scale=(0.05, 0.06), local_size=16, n_local=2)
    loader_cfg = LoaderConfig(shards=paths, backend=backend, batch_size=BATCH, num_workers=0, shuffle_buffer=0,
                              decode_threads=1, seed=3, epoch_length=5)
    batch = next(build_loader(loader_cfg, crops, MaskConfig(), (2, 2), 0, 1))
    assert batch["global_crops_uint8"].shape == (2 * BATCH, 3, TILE, TILE)
    assert batch["global_crops"].shape == (2 * BATCH, 3, TILE, TILE)
    assert batch["local_crops_uint8"].shape == (3 * BATCH, 3, 24, 24)
    assert batch["local_crops"].shape == (3 * BATCH, 3, 24, 24)
    # Whole-tile crops at the tile's size are the tile (DALI: up to its resampling), not a 5% zoom into it.
    tiles = torch.stack([decode_jpeg(jpgs[m["__key__"]]) for m in batch["meta"]]).repeat(2, 1, 1, 1)
    diff = (batch["global_crops_uint8"].int() - tiles.int()).abs().float().mean()
    assert diff < 2.0, diff
