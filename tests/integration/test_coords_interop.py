"""Issue 13.1: our coordinates files read through CLAM's and TRIDENT's own read paths give the tiles in the shards.

Neither tool is installed here, so their read paths are reimplemented below, citing the file they come from
(mahmoodlab/CLAM, mahmoodlab/TRIDENT); the slide is opened with our reader, whose `read_region` has OpenSlide's
contract (level-0 location, size at the level), as both tools' WSI objects do.
"""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gpfm_scale.config import build_config
from gpfm_scale.slides.open import open_slide
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import run
from tests.integration.tiling_helpers import decode, make_cohort, meta, read_samples

pytestmark = pytest.mark.usefixtures("ray_session")

# Mean absolute difference (0-255) allowed between a tool's read and our tile: the tools resize with PIL's bicubic
# filter where we use cv2's INTER_AREA, and our tiles are PNG here. A read of the wrong field of view (the bug:
# CLAM reading half the footprint) differs by far more (checked below).
SAME_TILE_MAD = 6.0


def _clam_reads(wsi, h5_path) -> dict[tuple[int, int], np.ndarray]:
    """CLAM's feature-extraction read, reimplemented.

    dataset_modules/dataset_h5.py `Whole_Slide_Bag_FP.__init__` reads `coords.attrs['patch_level']` and
    `['patch_size']`, and `__getitem__` does `wsi.read_region(coord, patch_level, (patch_size, patch_size))`;
    datasets/dataset_h5.py (CLAM's earlier `Whole_Slide_Bag_FP`, the target_patch_size option of
    extract_features_fp.py) then resizes to `(target_patch_size,) * 2` with PIL's `img.resize`.
    """
    with h5py.File(h5_path, "r") as f:
        coords, attrs = f["coords"][:], dict(f["coords"].attrs)
    level, size = int(attrs["patch_level"]), int(attrs["patch_size"])
    target = int(attrs["target_patch_size"])
    return {(x, y): np.asarray(Image.fromarray(wsi.read_region((x, y), level, (size, size))).resize((target, target)))
            for x, y in coords.tolist()}


def _trident_legacy_reads(wsi, h5_path, tile_px: int) -> dict[tuple[int, int], np.ndarray]:
    """TRIDENT pointed at the CLAM file, reimplemented: trident/wsi_objects/WSI.py `extract_patch_features` falls back
    to IO.py `read_coords_legacy` (patch_size, patch_level, `custom_downsample` default 1) and sets
    `target_magnification = mag / (level_downsamples[patch_level] * custom_downsample)`, so WSIPatcher reads a
    `patch_size * mag / target_magnification` level-0 footprint. Resized here to our tile side for the comparison."""
    with h5py.File(h5_path, "r") as f:
        coords, attrs = f["coords"][:], dict(f["coords"].attrs)
    ratio = wsi.level_downsamples[int(attrs["patch_level"])] * attrs.get("custom_downsample", 1)
    src = round(int(attrs["patch_size"]) * ratio)
    return {(x, y): np.asarray(Image.fromarray(wsi.read_region((x, y), 0, (src, src))).resize((tile_px,) * 2))
            for x, y in coords.tolist()}


def _trident_reads(wsi, h5_path) -> dict[tuple[int, int], np.ndarray]:
    """TRIDENT's feature-extraction read, reimplemented.

    trident/wsi_objects/WSI.py `extract_patch_features` takes `patch_size`, `level0_magnification` and
    `target_magnification` from the coords attrs (`read_coords`); trident/wsi_objects/WSIPatcher.py `__init__` sets
    `patch_size_src = round(patch_size * (10 / dst_mag) / (10 / src_mag))` (level-0 px), and `get_tile_xy` reads
    that footprint (here at level 0) and resizes it to `patch_size` with PIL (`pil=True`).
    """
    with h5py.File(h5_path, "r") as f:
        coords, attrs = f["coords"][:], dict(f["coords"].attrs)
    patch_size = int(attrs["patch_size"])
    src = round(patch_size * (10 / attrs["target_magnification"]) / (10 / attrs["level0_magnification"]))
    assert src == attrs["patch_size_level0"]
    return {(x, y): np.asarray(Image.fromarray(wsi.read_region((x, y), 0, (src, src))).resize((patch_size,) * 2))
            for x, y in coords.tolist()}


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), 1)


@pytest.mark.parametrize(("target_mpp", "level"), [(0.5, 0), (2.0, 1)])  # levels 0.25 and 1.0 µm/px: both resampled
def test_clam_and_trident_reads_give_the_shard_tiles(cohort, tmp_path, target_mpp, level):
    cfg = build_config(TilingConfig, {"grid": {"tile_px": 128, "target_mpp": target_mpp, "min_tissue_fraction": 0.25,
                                               "max_tiles_per_slide": 12}, "workers": 1, "encoding": "png"})
    assert run(cfg, str(cohort), str(tmp_path)).ok
    tiles = {(meta(s)["x"], meta(s)["y"]): decode(s["png"]) for s in read_samples(tmp_path)}
    assert tiles
    sid, path = pd.read_csv(cohort).iloc[0][["slide_id", "path"]]
    clam_file, trident_file = tmp_path / "patches" / f"{sid}.h5", tmp_path / "coords" / f"{sid}.h5"
    with h5py.File(clam_file, "r") as f:
        a = f["coords"].attrs
        assert (a["patch_level"], a["patch_size"], a["target_patch_size"]) == (level, 256, 128)
        assert "custom_downsample" not in a
        assert a["name"] == sid and a["downsample"].tolist() == [4.0 ** level] * 2
        assert tuple(a["level_dim"]) == tuple(a["downsampled_level_dim"]) == (2048 // 4 ** level, 1536 // 4 ** level)
    with h5py.File(trident_file, "r") as f:
        a = f["coords"].attrs
        assert (a["level0_width"], a["level0_height"], a["patch_size"]) == (2048, 1536, 128)
        assert a["patch_size_level0"] == 256 * 4 ** level and a["overlap"] == 0
    with open_slide(path) as wsi:
        clam, trident = _clam_reads(wsi, clam_file), _trident_reads(wsi, trident_file)
        legacy = _trident_legacy_reads(wsi, clam_file, 128)
        half_view = {xy: np.asarray(Image.fromarray(wsi.read_region(xy, level, (128, 128)))) for xy in tiles}
    assert set(clam) == set(trident) == set(legacy) == set(tiles)
    for xy, tile in tiles.items():
        assert _mad(clam[xy], tile) < SAME_TILE_MAD, xy
        assert _mad(trident[xy], tile) < SAME_TILE_MAD, xy
        assert _mad(legacy[xy], tile) < SAME_TILE_MAD, xy
    # the old attributes (patch_size = tile side at the read level): every tile a different field of view
    assert min(_mad(half_view[xy], tile) for xy, tile in tiles.items()) > 3 * SAME_TILE_MAD
