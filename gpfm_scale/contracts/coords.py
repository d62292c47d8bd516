"""The per-slide coordinates file, in the CLAM/TRIDENT `.h5` layout (DESIGN.md "Per-slide coordinates").

`DIR/coords/{slide_id}.h5` of a tiling output (`coords_parts`) holds:
- dataset `coords` (N, 2) int64: the level-0 top-left (x, y) px of every tile, in shard order;
- on it, the attributes `GEOMETRY_ATTRS` (tile side px at the output resolution and at level 0, the level read,
  µm/px and magnification of level 0 and of the output, overlap px at level 0), as CLAM/TRIDENT write them, so their
  MIL and slide-encoder tools read ours unchanged;
- dataset `tissue_fraction` (N,) float32: the tissue share of each tile's area, in [0, 1].
The tiling stage writes it (`write_coords`); `embed` copies the geometry onto its feature files (`read_geometry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

COORDS_DIR = "coords"
COORDS_DATASET = "coords"
TISSUE_DATASET = "tissue_fraction"
GEOMETRY_ATTRS = ("name", "patch_size", "patch_size_level0", "patch_level", "level0_mpp", "level0_magnification",
                  "target_mpp", "target_magnification", "overlap")


def coords_parts(slide_id: str) -> tuple[str, str]:
    """The file's path parts under a tiling output directory."""
    return COORDS_DIR, f"{slide_id}.h5"


def write_coords(path: str | Path, coords: np.ndarray, tissue_fraction: np.ndarray, geometry: dict[str, Any]) -> None:
    """Write one slide's file at `path` (the caller publishes it); `geometry` must hold every `GEOMETRY_ATTRS` key."""
    missing = [k for k in GEOMETRY_ATTRS if k not in geometry]
    if missing:
        raise ValueError(f"coords file geometry lacks {missing}")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(COORDS_DATASET, data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        ds.attrs.update(geometry)
        f.create_dataset(TISSUE_DATASET, data=np.asarray(tissue_fraction, dtype=np.float32))


def read_geometry(path: str | Path) -> dict[str, Any]:
    """The geometry attributes of a coords file (those set, whatever their names: newer writers may add some)."""
    with h5py.File(path, "r") as f:
        return {k: v for k, v in f[COORDS_DATASET].attrs.items() if v is not None}
