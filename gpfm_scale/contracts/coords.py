"""The per-slide coordinates files, in TRIDENT's and in CLAM's `.h5` layouts (DESIGN.md "Per-slide coordinates").

The two tools give `patch_size` different meanings, so one file cannot serve both once tiles are resampled:
TRIDENT (trident/wsi_objects/WSI.py `extract_tissue_coords` / `extract_patch_features`) takes it as the side at the
*output* resolution and reads a `patch_size * level0_magnification / target_magnification` level-0 footprint;
CLAM (dataset_modules/dataset_h5.py `Whole_Slide_Bag_FP.__getitem__`) reads `(patch_size, patch_size)` px at
`patch_level`, i.e. the side *at the level read*. Hence two files per slide:

`DIR/coords/{slide_id}.h5` (`coords_parts`, our contract; TRIDENT's `{job}/patches/{slide}_patches.h5`) holds
- dataset `coords` (N, 2) int64: the level-0 top-left (x, y) px of every tile, in shard order;
- on it, the attributes `GEOMETRY_ATTRS` in TRIDENT's meaning (tile side px at the output resolution and at level 0,
  magnification and µm/px of level 0 and of the output, overlap px at level 0, level-0 width/height, name,
  savetodir), so TRIDENT's MIL and slide-encoder tools read ours unchanged;
- dataset `tissue_fraction` (N,) float32: the tissue share of each tile's area, in [0, 1].
`DIR/patches/{slide_id}.h5` (`clam_parts`: CLAM's `create_patches_fp.py` layout, `--data_h5_dir DIR`) holds the
same `coords` with the attributes `CLAM_ATTRS` of wsi_core/WholeSlideImage.py `process_contour` (patch_size =
the side read at patch_level) plus `target_patch_size` (the tile side: extract_features_fp.py's resize option).
The tiling stage writes both (`write_coords`, `write_clam_coords`); `embed` copies the contract file's geometry onto
its feature files (`read_geometry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gpfm_scale import storage

COORDS_DIR = "coords"
COORDS_DATASET = "coords"
TISSUE_DATASET = "tissue_fraction"
CLAM_DIR = "patches"
GEOMETRY_ATTRS = ("name", "savetodir", "patch_size", "patch_size_level0", "level0_mpp", "level0_magnification",
                  "target_mpp", "target_magnification", "overlap", "level0_width", "level0_height")
CLAM_ATTRS = ("name", "save_path", "patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim",
              "target_patch_size")


def coords_parts(slide_id: str) -> tuple[str, str]:
    """The file's path parts under a tiling output directory."""
    return COORDS_DIR, f"{slide_id}.h5"


def clam_parts(slide_id: str) -> tuple[str, str]:
    """The CLAM-layout file's path parts under a tiling output directory."""
    return CLAM_DIR, f"{slide_id}.h5"


def _write(path: str | Path, coords: np.ndarray, geometry: dict[str, Any], required: tuple[str, ...], what: str,
           tissue_fraction: np.ndarray | None = None) -> None:
    """`coords` [N, 2] int64 with the `geometry` attributes (every `required` key), and `tissue_fraction` [N] when
    given, at `path` (the caller publishes it)."""
    missing = [k for k in required if k not in geometry]
    if missing:
        raise ValueError(f"{what} lacks {missing}")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(COORDS_DATASET, data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        ds.attrs.update(geometry)
        if tissue_fraction is not None:
            f.create_dataset(TISSUE_DATASET, data=np.asarray(tissue_fraction, dtype=np.float32))


def write_coords(path: str | Path, coords: np.ndarray, tissue_fraction: np.ndarray, geometry: dict[str, Any]) -> None:
    """Write one slide's file at `path` (the caller publishes it); `geometry` must hold every `GEOMETRY_ATTRS` key."""
    _write(path, coords, geometry, GEOMETRY_ATTRS, "coords file geometry", tissue_fraction)


def write_clam_coords(path: str | Path, coords: np.ndarray, geometry: dict[str, Any]) -> None:
    """Write one slide's CLAM-layout file at `path`; `geometry` must hold every `CLAM_ATTRS` key."""
    _write(path, coords, geometry, CLAM_ATTRS, "CLAM coords file")


def read_geometry(path: str | Path) -> dict[str, Any]:
    """The geometry attributes of a coords file (those set, whatever their names: newer writers may add some)."""
    with storage.open_h5(str(path)) as f:
        return {k: v for k, v in f[COORDS_DATASET].attrs.items() if v is not None}
