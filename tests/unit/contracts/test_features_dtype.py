"""Issue 13.2: the feature files read by plain h5py + PyTorch as CLAM/TRIDENT's do: float32 features, str paths."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from gpfm_scale.contracts.features import ImageFeatureWriter, write_image_features, write_slide_features


def test_slide_features_are_float32_unless_float16_was_chosen(tmp_path):
    rng = np.random.default_rng(0)
    write_slide_features(tmp_path, "s", rng.normal(size=(3, 4)), [[0, 0], [1, 1], [2, 2]], "m")  # float64 in
    with h5py.File(tmp_path / "features" / "s.h5", "r") as f:
        bag = torch.from_numpy(f["features"][:])
    assert bag.dtype == torch.float32 and torch.nn.Linear(4, 2)(bag).shape == (3, 2)  # no cast needed
    write_slide_features(tmp_path, "h", np.ones((1, 4), np.float16), [[0, 0]], "m")
    with h5py.File(tmp_path / "features" / "h.h5", "r") as f:
        assert f["features"].dtype == np.float16  # the opt-in halves the disk


def test_image_paths_read_back_as_str_and_features_as_float32(tmp_path):
    names = ["a/1.png", "b/é 2.png"]
    write_image_features(tmp_path / "one", np.zeros((2, 4), np.float64), names, "m")
    writer = ImageFeatureWriter(tmp_path / "inc", "m", 4)
    writer.append(np.zeros((2, 4), np.float32), names)
    writer.close()
    for root in ("one", "inc"):
        with h5py.File(tmp_path / root / "features" / "images.h5", "r") as f:
            assert f["features"].dtype == np.float32
            assert h5py.check_string_dtype(f["paths"].dtype).encoding == "utf-8"
            assert f["paths"].asstr()[:].tolist() == names
