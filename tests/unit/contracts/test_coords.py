"""The coordinates file: CLAM/TRIDENT layout written once, geometry read back as `embed` copies it."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from gpfm_scale.contracts.coords import GEOMETRY_ATTRS, read_geometry, write_coords


def test_coords_file_has_the_clam_layout_and_its_geometry_reads_back(tmp_path):
    geometry = {k: 1 for k in GEOMETRY_ATTRS} | {"name": "s1", "patch_size": 224, "patch_size_level0": 448}
    write_coords(tmp_path / "s1.h5", [[0, 0], [448, 0]], [1.0, 0.5], geometry)
    with h5py.File(tmp_path / "s1.h5") as f:
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (2, 2)
        assert f["tissue_fraction"].dtype == np.float32
    assert read_geometry(tmp_path / "s1.h5") == geometry


def test_a_geometry_without_a_contract_attribute_is_refused(tmp_path):
    with pytest.raises(ValueError, match="patch_size_level0"):
        write_coords(tmp_path / "s.h5", [[0, 0]], [1.0], {k: 1 for k in GEOMETRY_ATTRS if k != "patch_size_level0"})
