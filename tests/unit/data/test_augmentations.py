"""Multi-crop transform: shapes, uint8/float agreement, seeding, each augmentation in isolation, HED jitter."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from gpfm_scale.config import build_config
from gpfm_scale.data.augmentations import (
    MultiCropTransform,
    color_jitter,
    RandomHedJitter,
    denormalize_to_uint8,
    hed_jitter,
    normalize_uint8,
    rgb_to_hed,
    sample_crop_box,
    sample_hed_params,
)
from gpfm_scale.contracts.model_input import IMAGENET_MEAN, IMAGENET_STD
from gpfm_scale.data.config import CropConfig
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles
from gpfm_scale.errors import ConfigError

TINY = dict(global_size=32, local_size=16, n_local=3)
# Every random step off and crops spanning the whole (square) tile: the transform must return the tile itself.
OFF = dict(
    global_scale=(1.0, 1.0),
    local_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    hflip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_probabilities=(0.0, 0.0, 0.0),
    solarize_p_global2=0.0,
)


@pytest.fixture(scope="module")
def tile() -> torch.Tensor:
    return make_two_class_tiles(2, 48, seed=3)[0][0]


def _hed_numpy(img: np.ndarray) -> np.ndarray:
    """Independent stain separation (scikit-image's formula without its clip), uint8 [3, H, W] -> [3, H, W]."""
    rgb = np.maximum(img.astype(np.float64) / 255.0, 1e-6)
    m = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
    return np.einsum("chw,cd->dhw", np.log(rgb) / np.log(1e-6), m)


def test_shapes_and_dtypes(tile):
    out = MultiCropTransform(CropConfig(**TINY))(tile, generator=0)
    assert [tuple(x.shape) for x in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(x.shape) for x in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(x.dtype == torch.float32 for x in out["global_crops"] + out["local_crops"])
    assert [x.dtype for x in out["global_crops_uint8"]] == [torch.uint8] * 2
    assert [tuple(x.shape) for x in out["local_crops_uint8"]] == [(3, 16, 16)] * 3


def test_float_crops_are_the_uint8_crops_normalised(tile):
    out = MultiCropTransform(CropConfig(**TINY))(tile, generator=1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for u8, fl in zip(out["global_crops_uint8"] + out["local_crops_uint8"], out["global_crops"] + out["local_crops"]):
        torch.testing.assert_close(fl, (u8.float() / 255.0 - mean) / std, atol=1e-5, rtol=0)
        assert torch.equal(denormalize_to_uint8(fl, IMAGENET_MEAN, IMAGENET_STD), u8)


def test_normalize_off_returns_only_uint8(tile):
    out = MultiCropTransform(CropConfig(**TINY, normalize=False))(tile, generator=1)
    assert set(out) == {"global_crops_uint8", "local_crops_uint8"}


def test_same_seed_same_crops_and_global_rng_untouched(tile):
    transform = MultiCropTransform(CropConfig(**TINY, vflip_p=0.5, rot90_p=0.5, hed_jitter=0.1))
    state = torch.get_rng_state()
    a = transform(tile, generator=123)
    b = transform(tile, generator=torch.Generator().manual_seed(123))
    assert torch.equal(torch.get_rng_state(), state)
    c = transform(tile, generator=124)
    for key in a:
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
    assert not all(torch.equal(x, y) for x, y in zip(a["global_crops_uint8"], c["global_crops_uint8"]))


def test_no_generator_follows_global_seed(tile):
    transform = MultiCropTransform(CropConfig(**TINY))
    torch.manual_seed(7)
    a = transform(tile)["local_crops_uint8"]
    torch.manual_seed(7)
    b = transform(tile)["local_crops_uint8"]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_all_augmentations_off_is_identity(tile):
    out = MultiCropTransform(CropConfig(global_size=48, local_size=48, n_local=1, **OFF))(tile, generator=0)
    for crop in out["global_crops_uint8"] + out["local_crops_uint8"]:
        assert torch.equal(crop, tile)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (dict(hflip_p=1.0), lambda t: t.flip(-1)),
        (dict(vflip_p=1.0), lambda t: t.flip(-2)),
        (dict(grayscale_p=1.0), lambda t: ((0.2989 * t[0] + 0.587 * t[1] + 0.114 * t[2]).round()).expand(3, -1, -1)),
    ],
)
def test_single_augmentation(tile, options, expected):
    cfg = CropConfig(global_size=48, local_size=48, n_local=1, **{**OFF, **options})
    out = MultiCropTransform(cfg)(tile, generator=0)
    want = expected(tile.float())
    for crop in out["global_crops_uint8"] + out["local_crops_uint8"]:
        assert (crop.float() - want).abs().max() <= 1.0


def test_rot90_gives_a_quarter_turn(tile):
    cfg = CropConfig(global_size=48, local_size=48, n_local=4, **{**OFF, "rot90_p": 1.0})
    out = MultiCropTransform(cfg)(tile, generator=5)
    turns = [torch.rot90(tile, k, dims=(-2, -1)) for k in (1, 2, 3)]
    for crop in out["global_crops_uint8"] + out["local_crops_uint8"]:
        assert sum(torch.equal(crop, t) for t in turns) == 1


def test_solarize_only_on_second_global(tile):
    cfg = CropConfig(global_size=48, local_size=48, n_local=1, **{**OFF, "solarize_p_global2": 1.0})
    g1, g2 = MultiCropTransform(cfg)(tile, generator=0)["global_crops_uint8"]
    assert torch.equal(g1, tile)
    assert torch.equal(g2, torch.where(tile >= 128, 255 - tile, tile))


def test_blur_smooths(tile):
    cfg = CropConfig(global_size=48, local_size=48, n_local=1, **{**OFF, "blur_probabilities": (1.0, 0.0, 0.0)},
                     blur_sigma=(1.5, 1.5))
    g1, g2 = MultiCropTransform(cfg)(tile, generator=0)["global_crops_uint8"]
    assert torch.equal(g2, tile)
    hf = lambda x: x.float().diff(dim=-1).pow(2).mean()
    assert hf(g1) < 0.5 * hf(tile)


# Blur odds per crop kind (global 1, global 2, local): DINOv2's GaussianBlur(p) blurs with 1 - p, so GPFM's code
# ran "effective" while it reads "nominal".
PRESETS = {"effective": (0.0, 0.9, 0.5), "nominal": (1.0, 0.1, 0.5)}


def _within_binomial(hits: int, n: int, p: float) -> bool:
    """hits ~ Binomial(n, p) within 4.5 standard deviations (exact at p = 0 or 1)."""
    return abs(hits - n * p) <= 4.5 * (n * p * (1.0 - p)) ** 0.5


@pytest.fixture
def one_thread():
    """Tiny images: torch's intra-op threads only contend (10x slower on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("preset", ["effective", "nominal", (0.3, 0.6, 0.1)])
def test_blur_rates_per_crop_kind(preset, one_thread):
    """Count crops whose pixels the blur changed, over 200 seeds: whole-tile crops with every other step off, so
    an unblurred crop is the tile itself, and sigma >= 1 so that a blurred one is not."""
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = CropConfig(global_size=16, local_size=16, n_local=2, **{**OFF, "blur_probabilities": preset},
                     blur_sigma=(1.0, 2.0))
    transform, n = MultiCropTransform(cfg), 200
    hits = [0, 0, 0]
    for seed in range(n):
        out = transform(image, generator=seed)
        crops = [(0, out["global_crops_uint8"][0]), (1, out["global_crops_uint8"][1])]
        for kind, crop in crops + [(2, c) for c in out["local_crops_uint8"]]:
            hits[kind] += not torch.equal(crop, image)
    expected = PRESETS[preset] if isinstance(preset, str) else preset
    assert cfg.blur_p == expected
    for kind, (count, p) in enumerate(zip(hits, expected)):
        draws = n * (cfg.n_local if kind == 2 else 1)
        assert _within_binomial(count, draws, p), (kind, count / draws, p)


def test_blur_default_is_what_gpfm_ran_and_bad_values_are_refused():
    assert CropConfig().blur_p == (0.0, 0.9, 0.5)
    assert build_config(CropConfig, {"blur_probabilities": "nominal"}).blur_p == (1.0, 0.1, 0.5)
    assert build_config(CropConfig, {"blur_probabilities": [0, 0.5, 1]}).blur_p == (0.0, 0.5, 1.0)
    for bad in ("nominl", [0.1, 1.5, 0.2], [0.5, 0.5], True):
        with pytest.raises(ConfigError, match="blur_probabilities.*effective.*nominal"):
            build_config(CropConfig, {"blur_probabilities": bad})


def test_color_jitter_is_torchvision_in_the_given_order(tile):
    """The order matters (so a fixed order would be a different augmentation) and is the one given."""
    factors = (1.3, 0.7, 1.2, 0.08)
    forward = color_jitter(tile, factors, [0, 1, 2, 3])
    want = v2.functional.adjust_hue(v2.functional.adjust_saturation(v2.functional.adjust_contrast(
        v2.functional.adjust_brightness(tile, 1.3), 0.7), 1.2), 0.08)
    assert torch.equal(forward, want)
    backward = color_jitter(tile, factors, [3, 2, 1, 0])
    assert (forward.int() - backward.int()).abs().max() > 8


def test_crop_box_bounds_and_fallback():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = sample_crop_box(60, 80, (0.05, 0.32), (0.75, 4 / 3), g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.04 <= h * w / 4800 <= 0.34 and 0.7 <= w / h <= 1.4
    # Whole-area square crop of a 40x60 image never fits: centred 40x40 fallback.
    assert sample_crop_box(40, 60, (1.0, 1.0), (1.0, 1.0), g) == (0, 10, 40, 40)


def test_rejects_non_uint8_chw():
    transform = MultiCropTransform(CropConfig(**TINY))
    with pytest.raises(ValueError, match="uint8 RGB tensor"):
        transform(torch.rand(3, 40, 40))
    with pytest.raises(ValueError, match="uint8 RGB tensor"):
        transform(torch.zeros(40, 40, 3, dtype=torch.uint8))


def test_config_validation():
    with pytest.raises(ConfigError, match="global_scale"):
        build_config(CropConfig, {"global_scale": [0.9, 0.3]})
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        build_config(CropConfig, {"colour": 1})
    assert build_config(CropConfig, {"local_scale": [0.1, 0.3]}).local_scale == (0.1, 0.3)


def test_hed_matches_scikit_image(tile):
    skcolor = pytest.importorskip("skimage.color")
    ours = rgb_to_hed(tile).numpy()
    ref = skcolor.rgb2hed(tile.permute(1, 2, 0).numpy()).transpose(2, 0, 1)
    np.testing.assert_allclose(np.maximum(ours, 0.0), ref, atol=1e-6)


def test_hed_jitter_identity_roundtrip_and_strength_zero(tile):
    assert torch.equal(hed_jitter(tile, torch.ones(3), torch.zeros(3)), tile)
    assert torch.equal(v2.Compose([RandomHedJitter(0.0)])(tile), tile)
    cfg = CropConfig(global_size=48, local_size=48, n_local=1, **OFF, hed_jitter=0.0)
    assert torch.equal(MultiCropTransform(cfg)(tile, generator=0)["global_crops_uint8"][0], tile)


def test_hed_jitter_changes_stains_within_bounds():
    s = 0.03
    image = torch.randint(90, 170, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        alpha, beta = sample_hed_params(s, g)
        assert ((alpha - 1).abs() <= s).all() and (beta.abs() <= s).all()
        x = image.numpy()
        y = hed_jitter(image, alpha, beta).numpy()
        ok = ((y > 5) & (y < 250)).all(axis=0)  # away from clipping
        assert ok.sum() > 100
        before, after = _hed_numpy(x)[:, ok], _hed_numpy(y)[:, ok]
        assert np.abs(after - before).mean() > 1e-3
        for c in range(3):  # independent stain separation recovers s' = alpha * s + beta
            slope, intercept = np.polyfit(before[c], after[c], 1)
            assert abs(slope - float(alpha[c])) < 0.01 and abs(intercept - float(beta[c])) < 0.002


def test_random_hed_jitter_in_v2_compose():
    image = torch.randint(90, 170, (3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    out = v2.Compose([RandomHedJitter(0.03)])(tv_tensors.Image(image))
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.uint8
    assert not torch.equal(out.as_subclass(torch.Tensor), image)
    assert torch.equal(v2.Compose([RandomHedJitter(0.03, p=0.0)])(image), image)


def test_normalize_uint8_batch_matches_torchvision():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    want = v2.functional.normalize(x.float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(normalize_uint8(x, IMAGENET_MEAN, IMAGENET_STD), want, atol=1e-5, rtol=0)
