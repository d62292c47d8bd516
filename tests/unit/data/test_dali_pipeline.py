"""The DALI loader on CPU (device_id=None): same batch structure as the torch path, rank split, determinism,
operator mappings (colour jitter = the torch path's pixels, blur odds per crop kind), and what happens on a
corrupt JPEG (DALI stops; `auto` continues with the torch loader)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

pytest.importorskip("nvidia.dali")

from gpfm_scale.data import dali_colour  # noqa: E402
from gpfm_scale.data.augmentations import color_jitter, normalize_uint8  # noqa: E402
from gpfm_scale.data.config import CropConfig, MaskConfig  # noqa: E402
from gpfm_scale.data.crop_recipe import CropRecipe  # noqa: E402
from gpfm_scale.data.dali_pipeline import (_augment, _colour, _jitter_draws, _rot90,  # noqa: E402
                                           _solarize, build_dali_loader, build_dali_pipeline, fn, pipeline_def,
                                           types)
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles  # noqa: E402
from gpfm_scale.data.loader import with_fallback  # noqa: E402
from gpfm_scale.data.loader_config import LoaderConfig  # noqa: E402
from gpfm_scale.data.shard_stream import build_torch_loader  # noqa: E402
from gpfm_scale.errors import ConfigError  # noqa: E402
from tests.unit.data.shard_helpers import batch_keys, make_shards  # noqa: E402

CROPS = CropConfig(global_size=32, local_size=16, n_local=2)
MASKS = MaskConfig()
GRID = (2, 2)
SEED = 7


def _cfg(shards, **overrides) -> LoaderConfig:
    base = {"shards": shards, "backend": "dali", "batch_size": 4, "num_workers": 0, "shuffle_buffer": 4,
            "decode_threads": 1, "seed": SEED, "epoch_length": 1250}
    return LoaderConfig(**{**base, **overrides})


def _dali(cfg: LoaderConfig, rank: int = 0, world: int = 1):
    return build_dali_loader(cfg, CROPS, MASKS, GRID, rank, world, device_id=None)


def test_cpu_batch_has_the_structure_of_the_torch_batch(good):
    paths, jpgs = good
    cfg = _cfg(paths)
    dali = next(_dali(cfg))
    ref = next(build_torch_loader(cfg.model_copy(update={"backend": "torch"}), CROPS, MASKS, GRID, rank=0))
    assert dali.keys() == ref.keys()
    for key, value in ref.items():
        if isinstance(value, torch.Tensor):
            assert (dali[key].shape, dali[key].dtype) == (value.shape, value.dtype), key
    assert torch.equal(dali["masks"], ref["masks"])  # same mask seed per (seed, rank, step)
    assert dali["step"] == 0 and dali["stats"] == {"corrupt": 0, "shard_errors": 0, "samples": 4}
    for crops in ("global_crops", "local_crops"):
        expected = normalize_uint8(dali[f"{crops}_uint8"], CROPS.mean, CROPS.std)
        torch.testing.assert_close(dali[crops], expected, atol=1e-5, rtol=0)
    for meta in dali["meta"]:
        assert meta.keys() == ref["meta"][0].keys() and meta["__key__"] in jpgs and meta["shard"] in paths
        slide, xy = meta["__key__"].split("/")
        assert meta["json"] == {"slide_id": slide, "x": int(xy.split("_")[0]), "y": 0}


def test_ranks_read_disjoint_samples_and_same_seed_repeats(good):
    paths, _ = good
    cfg = _cfg(paths)
    rank0, rank1 = _dali(cfg, 0, 2), _dali(cfg, 1, 2)
    first0, first1 = next(rank0), next(rank1)
    assert not set(batch_keys(first0)) & set(batch_keys(first1))
    again = next(_dali(cfg, 0, 2))
    assert batch_keys(again) == batch_keys(first0)
    assert torch.equal(again["global_crops_uint8"], first0["global_crops_uint8"])


def test_corrupt_jpeg_stops_dali_and_auto_continues_with_torch(tmp_path, caplog):
    paths, _ = make_shards(tmp_path, 1, 6, {"s0/1_0": "truncated_jpeg"})
    cfg = _cfg(paths, shuffle_buffer=0)
    with pytest.raises(RuntimeError, match="s0/1_0"):
        next(_dali(cfg))
    torch_cfg = cfg.model_copy(update={"backend": "torch", "open_shards": 1, "random_start": False})
    with caplog.at_level(logging.ERROR, logger="gpfm_scale.data.loader"):
        stream = with_fallback(_dali(cfg), lambda step: build_torch_loader(torch_cfg, CROPS, MASKS, GRID, 0, step), 0)
        got = [next(stream) for _ in range(2)]
    ref = build_torch_loader(torch_cfg, CROPS, MASKS, GRID, 0, 0)
    for batch in got:
        expected = next(ref)
        assert batch["step"] == expected["step"] and batch_keys(batch) == batch_keys(expected)
        assert torch.equal(batch["global_crops"], expected["global_crops"])
    assert "s0/1_0" not in batch_keys(got[0]) and got[0]["stats"]["corrupt"] == 1
    assert "continuing with the torch loader" in caplog.text


def _run_on(image: np.ndarray, graph, n: int = 16, runs: int = 1, extra: tuple = ()) -> list[tuple[np.ndarray, ...]]:
    """Run `graph(x, *extra)` in a CPU DALI pipeline on n copies of one HWC uint8 image, `runs` times; `extra`:
    per-sample constant columns (lists of n numpy scalars) fed by external sources. One tuple of outputs per sample.
    """
    def constant(column):  # a source without parameters (DALI would pass one the iteration number)
        return lambda: list(column)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=3, enable_conditionals=True)
    def pipe():
        inputs = [fn.external_source(source=constant(col), batch=True) for col in extra]
        out = graph(fn.external_source(source=lambda: [image] * n, layout="HWC", batch=True), *inputs)
        return out if isinstance(out, tuple) else (out,)

    p = pipe()
    p.build()
    samples = []
    for _ in range(runs):
        outs = p.run()
        samples += [tuple(np.array(o.at(i)) for o in outs) for i in range(n)]
    return samples


def _tile_hwc() -> np.ndarray:
    return make_two_class_tiles(2, 24, seed=3)[0][0].permute(1, 2, 0).numpy().copy()


def _torch_jitter(image: np.ndarray, factors, order) -> np.ndarray:
    chw = torch.from_numpy(image).permute(2, 0, 1)
    return color_jitter(chw, tuple(float(f) for f in factors), list(order)).permute(1, 2, 0).numpy()


def _assert_same_pixels(got: np.ndarray, want: np.ndarray) -> float:
    """Equal up to float32 rounding: at most one grey level, on under 0.5% of the values. Returns that fraction."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.005
    return float((diff > 0).mean())


def test_colour_jitter_matches_the_torch_path_for_every_order():
    """Fixed factors and each of the 24 orders: DALI's jitter gives torchvision's pixels (torch path), on an H&E-like
    tile and on noise (all hue sectors, grey pixels, clipping). The colour-twist mapping it replaces missed the same
    factors (in torchvision's order b, c, s, h) by up to 96 grey levels, 11 on average, on the tile."""
    rng = np.random.default_rng(0)
    n = len(dali_colour.PERMUTATIONS)
    factors = [rng.uniform([0.6, 0.6, 0.8, -0.1], [1.4, 1.4, 1.2, 0.1]).astype(np.float32) for _ in range(n)]
    columns = tuple([f[j] for f in factors] for j in range(4)) + ([np.int32(k) for k in range(n)],)
    noise = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    noise[:3] = noise[:3, :, :1]  # grey pixels: HSV's special case (max == min)
    noise[3, :, 0], noise[4, :, 1] = 255, 0
    for image in (_tile_hwc(), noise):
        def graph(x, b, c, s, h, order):
            return dali_colour.to_uint8(dali_colour.color_jitter(dali_colour.to_float(x), (b, c, s, h), order))

        out = _run_on(image, graph, n=n, extra=columns)
        for k, (got,) in enumerate(out):
            _assert_same_pixels(got, _torch_jitter(image, factors[k], dali_colour.PERMUTATIONS[k]))


def test_colour_jitter_draws_in_the_pipeline():
    """What the pipeline draws (factors in torchvision's ranges, all 24 orders, uniformly) is what it applies."""
    cfg = CropConfig(jitter_brightness=0.4, jitter_contrast=0.4, jitter_saturation=0.2, jitter_hue=0.1)
    image = _tile_hwc()

    def graph(x):  # inside a per-sample conditional, as in `_colour`
        factors, order = _jitter_draws(cfg)
        coin = fn.random.coin_flip(probability=0.5, dtype=types.BOOL)
        if coin:
            x = dali_colour.to_uint8(dali_colour.color_jitter(dali_colour.to_float(x), factors, order))
        return (x, *factors, order, coin)

    samples = _run_on(image, graph, n=64, runs=6)
    assert 0 < sum(bool(s[6]) for s in samples) < len(samples)
    assert all(np.array_equal(s[0], image) for s in samples if not s[6])
    samples = [s[:6] for s in samples if s[6]]
    orders = np.array([int(s[5]) for s in samples])
    assert set(orders) == set(range(24)) and np.bincount(orders).max() < 3 * len(orders) / 24
    f = np.array([[float(v) for v in s[1:5]] for s in samples])
    assert (f.min(0) >= [0.6, 0.6, 0.8, -0.1]).all() and (f.max(0) <= [1.4, 1.4, 1.2, 0.1]).all()
    assert (f.max(0) - f.min(0) > [0.6, 0.6, 0.3, 0.15]).all()
    for out, *params, order in samples[:32]:
        _assert_same_pixels(out, _torch_jitter(image, params, dali_colour.PERMUTATIONS[int(order)]))
    off = CropConfig(jitter_saturation=0.0, jitter_hue=0.0)  # a strength of 0: factor exactly 1, as torchvision
    draws = _run_on(image, lambda x: (x, *_jitter_draws(off)[0][:3]), n=8)
    assert all(float(d[3]) == 1.0 and float(d[1]) != 1.0 for d in draws)


PRESETS = {"effective": (0.0, 0.9, 0.5), "nominal": (1.0, 0.1, 0.5)}


@pytest.mark.parametrize("preset", ["effective", "nominal"])
def test_blur_rates_per_crop_kind(preset):
    """Fraction of crops whose pixels the blur changed, per kind, over 256 images: whole-image crops with every
    other step off (an unblurred crop is the image, within DALI's resampling), sigma >= 1 on noise."""
    cfg = CropConfig(global_size=12, local_size=12, n_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
                     crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0, solarize_p_global2=0.0,
                     blur_probabilities=preset, blur_sigma=(1.0, 2.0), blur_kernel=5)
    image = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    kinds = CropRecipe.from_config(cfg).crops
    samples = _run_on(image, lambda x: tuple(_augment(x, k, cfg) for k in kinds), n=64, runs=4)
    diffs = np.array([[np.abs(c.astype(int) - image).max() for c in crops] for crops in samples])
    assert ((diffs <= 2) | (diffs > 8)).all()  # unblurred: the image up to resampling; blurred: far from it
    changed = diffs > 8
    rates = [changed[:, 0], changed[:, 1], changed[:, 2:].ravel()]
    for kind, (hits, p) in enumerate(zip(rates, PRESETS[preset])):
        n = hits.size
        assert abs(hits.sum() - n * p) <= 4.5 * (n * p * (1 - p)) ** 0.5, (kind, hits.mean(), p)


def test_rot90_solarize_and_grayscale_mappings_match_torchvision():
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    rotations = [torch.rot90(chw, k, dims=(-2, -1)).permute(1, 2, 0).numpy() for k in (1, 2, 3)]
    outputs = [o for (o,) in _run_on(image, lambda x: _rot90(x, 1.0))]
    matched = [[np.array_equal(o, r) for r in rotations].index(True) for o in outputs]
    assert set(matched) == {0, 1, 2}  # every output is one exact rotation, and all three occur
    solarized = F.solarize(chw, threshold=128).permute(1, 2, 0).numpy()
    assert np.array_equal(_run_on(image, lambda x: _solarize(x, 128), n=1)[0][0], solarized)
    gray_cfg = CropConfig(jitter_p=0.0, grayscale_p=1.0)
    gray = F.rgb_to_grayscale(chw, num_output_channels=3).permute(1, 2, 0).numpy()
    gray_kind = CropRecipe.from_config(gray_cfg).global_crops[0]
    assert np.array_equal(_run_on(image, lambda x: _colour(x, gray_kind, gray_cfg), n=1)[0][0], gray)


def test_remote_urls_are_refused():
    with pytest.raises(ConfigError, match="local or mounted"):
        build_dali_pipeline(["s3://bucket/run-000000.tar"], _cfg("unused"), CROPS, 0, 1, None)


@pytest.mark.gpu
def test_gpu_mixed_decode_gives_cuda_tensors_of_the_cpu_shapes(good):
    paths, jpgs = good
    cfg = _cfg(paths, decode_threads=2)
    gpu = next(build_dali_loader(cfg, CROPS, MASKS, GRID, 0, 1, device_id=0))
    cpu = next(_dali(cfg))
    for key in ("global_crops", "local_crops", "global_crops_uint8", "local_crops_uint8"):
        assert gpu[key].is_cuda and gpu[key].shape == cpu[key].shape and gpu[key].dtype == cpu[key].dtype
    torch.testing.assert_close(gpu["global_crops"].cpu(),
                               normalize_uint8(gpu["global_crops_uint8"].cpu(), CROPS.mean, CROPS.std),
                               atol=1e-5, rtol=0)
    assert set(batch_keys(gpu)) <= set(jpgs) and len(batch_keys(gpu)) == 4
