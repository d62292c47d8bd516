"""The DALI loader on CPU (device_id=None): same batch structure as the torch path, rank split, determinism,
operator mappings, and what happens on a corrupt JPEG (DALI stops; `auto` continues with the torch loader)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

pytest.importorskip("nvidia.dali")

from gpfm_scale.data.augmentations import normalize_uint8  # noqa: E402
from gpfm_scale.data.config import CropConfig, MaskConfig  # noqa: E402
from gpfm_scale.data.dali_pipeline import (_colour, _rot90, _solarize, build_dali_loader,  # noqa: E402
                                           build_dali_pipeline, fn, pipeline_def)
from gpfm_scale.data.loader_config import LoaderConfig  # noqa: E402
from gpfm_scale.data.shard_stream import build_torch_loader, with_fallback  # noqa: E402
from gpfm_scale.errors import ConfigError  # noqa: E402
from tests.unit.data.shard_helpers import batch_keys, make_shards  # noqa: E402

CROPS = CropConfig(global_size=32, local_size=16, n_local=2)
MASKS = MaskConfig()
GRID = (2, 2)
SEED = 7


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(shards, **overrides) -> LoaderConfig:
    base = {"shards": shards, "backend": "dali", "batch_size": 4, "num_workers": 0, "shuffle_buffer": 4,
            "decode_threads": 1, "seed": SEED}
    return LoaderConfig(**{**base, **overrides})


def _dali(cfg: LoaderConfig, rank: int = 0, world: int = 1):
    return build_dali_loader(cfg, CROPS, MASKS, GRID, rank, world, device_id=None)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("dali_good"), n_shards=3, per_shard=6)


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
    with caplog.at_level(logging.ERROR, logger="gpfm_scale.data.shard_stream"):
        stream = with_fallback(_dali(cfg), lambda step: build_torch_loader(torch_cfg, CROPS, MASKS, GRID, 0, step), 0)
        got = [next(stream) for _ in range(2)]
    ref = build_torch_loader(torch_cfg, CROPS, MASKS, GRID, 0, 0)
    for batch in got:
        expected = next(ref)
        assert batch["step"] == expected["step"] and batch_keys(batch) == batch_keys(expected)
        assert torch.equal(batch["global_crops"], expected["global_crops"])
    assert "s0/1_0" not in batch_keys(got[0]) and got[0]["stats"]["corrupt"] == 1
    assert "continuing with the torch loader" in caplog.text


def _run_on(image: np.ndarray, graph, n: int = 16) -> list[np.ndarray]:
    """Run `graph(x)` in a CPU DALI pipeline on n copies of one HWC uint8 image."""
    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=3, enable_conditionals=True)
    def pipe():
        return graph(fn.external_source(source=lambda: [image] * n, layout="HWC", batch=True))

    p = pipe()
    p.build()
    out = p.run()[0]
    return [np.array(out.at(i)) for i in range(n)]


def test_rot90_solarize_and_grayscale_mappings_match_torchvision():
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    rotations = [torch.rot90(chw, k, dims=(-2, -1)).permute(1, 2, 0).numpy() for k in (1, 2, 3)]
    matched = [[np.array_equal(o, r) for r in rotations].index(True) for o in _run_on(image, lambda x: _rot90(x, 1.0))]
    assert set(matched) == {0, 1, 2}  # every output is one exact rotation, and all three occur
    solarized = F.solarize(chw, threshold=128).permute(1, 2, 0).numpy()
    assert np.array_equal(_run_on(image, lambda x: _solarize(x, 128), n=1)[0], solarized)
    gray_cfg = CropConfig(jitter_p=0.0, grayscale_p=1.0)
    gray = F.rgb_to_grayscale(chw, num_output_channels=3).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(_run_on(image, lambda x: _colour(x, gray_cfg), n=1)[0].astype(int) - gray).max() <= 1


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
