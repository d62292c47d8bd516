"""Multi-crop collation: DINOv2 crop ordering, mask bookkeeping, metadata pass-through."""

import numpy as np
import pytest
import torch

from gpfm_scale.data.augmentations import MultiCropTransform
from gpfm_scale.data.collate import collate_multicrop
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles

B, N_LOCAL = 3, 2


def _marked_sample(i: int) -> dict:
    """Crops filled with a code naming (image, crop), so rows can be traced: global c -> 10*i + c, local j -> 100+."""
    full = lambda v, s: torch.full((3, s, s), v, dtype=torch.uint8)
    return {
        "global_crops_uint8": [full(10 * i + c, 8) for c in range(2)],
        "local_crops_uint8": [full(100 + 10 * i + j, 4) for j in range(N_LOCAL)],
        "global_crops": [full(10 * i + c, 8).float() for c in range(2)],
        "local_crops": [full(100 + 10 * i + j, 4).float() for j in range(N_LOCAL)],
        "__key__": f"slide/{i}",
        "json": {"x": i},
    }


@pytest.fixture
def batch() -> dict:
    return collate_multicrop([_marked_sample(i) for i in range(B)], MaskConfig(), (4, 4), np.random.default_rng(0))


def test_crop_ordering(batch):
    assert batch["global_crops"].shape == (2 * B, 3, 8, 8) and batch["local_crops"].shape == (N_LOCAL * B, 3, 4, 4)
    for i in range(B):
        assert batch["global_crops_uint8"][i].unique().tolist() == [10 * i]  # crop A of image i at row i
        assert batch["global_crops_uint8"][B + i].unique().tolist() == [10 * i + 1]  # crop B at row B + i
        assert batch["global_crops"][B + i].unique().tolist() == [10 * i + 1]
        for j in range(N_LOCAL):
            assert batch["local_crops_uint8"][j * B + i].unique().tolist() == [100 + 10 * i + j]


def test_mask_bookkeeping(batch):
    masks = batch["masks"]
    assert masks.shape == (2 * B, 16) and masks.dtype == torch.bool
    assert int((masks.sum(1) > 0).sum()) == int(2 * B * 0.5)
    assert torch.equal(batch["mask_indices"], torch.nonzero(masks.flatten()).flatten())
    n_per = masks.sum(1)
    assert torch.equal(batch["n_masked_per_image"], n_per)
    assert batch["n_masked_patches"].tolist() == [int(masks.sum())]
    assert batch["masks_weight"].numel() == int(masks.sum())
    rows = batch["mask_indices"] // 16
    torch.testing.assert_close(batch["masks_weight"], 1.0 / n_per[rows].float())
    assert batch["masks_weight"].sum().item() == pytest.approx(float((n_per > 0).sum()))
    assert int(masks.sum()) <= batch["upperbound"]


def test_meta_passes_through_in_order(batch):
    assert batch["meta"] == [{"__key__": f"slide/{i}", "json": {"x": i}} for i in range(B)]


def test_real_transform_output_and_uint8_only_path():
    tiles, _ = make_two_class_tiles(2, 40, seed=0)
    transform = MultiCropTransform(CropConfig(global_size=32, local_size=16, n_local=0, normalize=False))
    samples = [transform(t, generator=i) for i, t in enumerate(tiles)]
    out = collate_multicrop(samples, MaskConfig(), (2, 2), np.random.default_rng(0))
    assert "global_crops" not in out and out["global_crops_uint8"].shape == (4, 3, 32, 32)
    assert out["local_crops_uint8"].shape == (0,)
    assert torch.equal(out["global_crops_uint8"][2], samples[0]["global_crops_uint8"][1])
    # 2 of 4 crops masked with ratios in [0.1, 0.3] and [0.3, 0.5] of 4 tokens: int() gives 0-1 and 1-2 patches.
    counts = sorted(out["masks"].sum(1).tolist())
    assert out["masks"].shape == (4, 4) and counts[:2] == [0, 0] and counts[2] <= 1 and 1 <= counts[3] <= 2


def test_masks_reproducible_and_follow_torch_seed_without_rng():
    samples = [_marked_sample(i) for i in range(B)]
    a = collate_multicrop(samples, MaskConfig(), (6, 6), np.random.default_rng(9))["masks"]
    b = collate_multicrop(samples, MaskConfig(), (6, 6), np.random.default_rng(9))["masks"]
    assert torch.equal(a, b)
    torch.manual_seed(4)
    c = collate_multicrop(samples, MaskConfig(), (6, 6))["masks"]
    torch.manual_seed(4)
    d = collate_multicrop(samples, MaskConfig(), (6, 6))["masks"]
    assert torch.equal(c, d)


def test_rejects_empty_and_ragged_batches():
    with pytest.raises(ValueError, match="at least one sample"):
        collate_multicrop([], MaskConfig(), (4, 4))
    ragged = [_marked_sample(0), _marked_sample(1)]
    ragged[1]["local_crops"] = ragged[1]["local_crops"][:1]
    with pytest.raises(ValueError, match="number of local_crops"):
        collate_multicrop(ragged, MaskConfig(), (4, 4))
