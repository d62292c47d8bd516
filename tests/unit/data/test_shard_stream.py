"""The torch loader over WebDataset shards: layout, rank streams, determinism, exact resume, damage handling."""

from __future__ import annotations

import io
import logging
import tarfile
import uuid

import fsspec
import pytest
import torch

from gpfm_scale.data.augmentations import MultiCropTransform
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader_config import LoaderConfig, LoaderSettings
from gpfm_scale.data.masking import MaskGenerator, sample_masks
from gpfm_scale.data.loader import build_loader, resolve_backend
from gpfm_scale.data.seeds import batch_mask_rng, sample_generator
from gpfm_scale.data.shard_stream import _shard_cycle, first_step_in_epoch
from gpfm_scale.data.shard_urls import expand_shard_urls
from gpfm_scale.data.tar_samples import (
    CorruptSampleError,
    RawSample,
    decode_sample,
    iter_raw_samples,
    validate_shards,
)
from gpfm_scale.errors import ConfigError, ShardError
from tests.unit.data.shard_helpers import batch_keys, decode_jpeg, make_shards

CROPS = CropConfig(global_size=32, local_size=16, n_local=2)
MASKS = MaskConfig()
GRID = (2, 2)
SEED = 7


def _cfg(shards, **overrides) -> LoaderConfig:
    base = {"shards": shards, "backend": "torch", "batch_size": 4, "num_workers": 0, "shuffle_buffer": 4,
            "epoch_length": 3, "seed": SEED}
    return LoaderConfig(**{**base, **overrides})


def _loader(cfg: LoaderConfig, rank: int = 0, world: int = 1, start: int = 0):
    return build_loader(cfg, CROPS, MASKS, GRID, rank, world, start_step=start)


def _assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("damaged"), n_shards=2, per_shard=6,
                       damaged={"s0/2_0": "truncated_jpeg", "s1/3_0": "bad_json"})


def test_batch_is_the_collated_crops_of_its_keys(good):
    """Every row is recomputed independently from the key's JPEG and the documented per-sample seed."""
    paths, jpgs = good
    batch = next(_loader(_cfg(paths)))
    b = 4
    assert batch["global_crops"].shape == (2 * b, 3, 32, 32) and batch["global_crops"].dtype == torch.float32
    assert batch["local_crops"].shape == (2 * b, 3, 16, 16)
    assert batch["global_crops_uint8"].dtype == torch.uint8 and batch["local_crops_uint8"].shape == (2 * b, 3, 16, 16)
    assert batch["masks"].shape == (2 * b, 4) and batch["masks"].dtype == torch.bool
    assert batch["step"] == 0 and batch["stats"] == {"corrupt": 0, "shard_errors": 0, "samples": b}
    transform = MultiCropTransform(CROPS)
    for i, key in enumerate(batch_keys(batch)):
        crops = transform(decode_jpeg(jpgs[key]), sample_generator(SEED, 0, 0, i))
        assert torch.equal(batch["global_crops_uint8"][i], crops["global_crops_uint8"][0])
        assert torch.equal(batch["global_crops_uint8"][b + i], crops["global_crops_uint8"][1])
        assert torch.equal(batch["global_crops"][b + i], crops["global_crops"][1])
        for j in range(2):
            assert torch.equal(batch["local_crops_uint8"][j * b + i], crops["local_crops_uint8"][j])
        slide, xy = key.split("/")
        assert batch["meta"][i]["json"] == {"slide_id": slide, "x": int(xy.split("_")[0]), "y": 0}
        assert batch["meta"][i]["shard"] in paths
    expected = sample_masks(2 * b, MASKS.ratio_range, MASKS.mask_probability, MaskGenerator.from_config(MASKS, *GRID),
                            batch_mask_rng(SEED, 0, 0))
    assert torch.equal(batch["masks"], expected)


def test_two_ranks_differ_and_together_cover_the_shards(good):
    paths, jpgs = good
    cfg = _cfg(paths, batch_size=3, shuffle_buffer=2)
    seen = {}
    for rank in (0, 1):
        it = _loader(cfg, rank=rank, world=2)
        seen[rank] = [batch_keys(next(it)) for _ in range(24)]
    assert seen[0][0] != seen[1][0]
    assert {k for r in seen.values() for keys in r for k in keys} == set(jpgs)


def test_same_config_gives_identical_batches(good):
    paths, _ = good
    cfg = _cfg(paths, num_workers=2)
    a, b = _loader(cfg), _loader(cfg)
    for _ in range(4):
        _assert_same_batch(next(a), next(b))


@pytest.mark.parametrize(("workers", "start"), [(2, 5), (0, 2)])
def test_resume_yields_exactly_the_uninterrupted_batches(damaged, workers, start):
    """epoch_length 3: the resumed stretch crosses an epoch boundary; the shards hold two corrupt samples."""
    paths, _ = damaged
    cfg = _cfg(paths, batch_size=2, num_workers=workers)
    full = _loader(cfg, rank=1, world=2)
    reference = [next(full) for _ in range(start + 4)]
    resumed = _loader(cfg, rank=1, world=2, start=start)
    got = [next(resumed) for _ in range(4)]
    assert [b["step"] for b in got] == list(range(start, start + 4))
    for ref, new in zip(reference[start:], got):
        _assert_same_batch(ref, new)
    assert sum(b["stats"]["corrupt"] for b in reference) > 0  # the replay skipped over corrupt samples too


def test_open_shards_mix_slides(good):
    paths, _ = good
    keys = batch_keys(next(_loader(_cfg(paths, batch_size=9, shuffle_buffer=0, open_shards=3))))
    by_slide: dict[str, list[int]] = {}
    for key in keys:
        slide, xy = key.split("/")
        by_slide.setdefault(slide, []).append(int(xy.split("_")[0]))
    assert len(by_slide) >= 2  # one open shard at a time would give a single slide here (6 tiles per shard)


def test_first_step_in_epoch_by_hand():
    # epoch_length 3, 2 streams: epoch 1 = steps 3, 4, 5 -> stream 1 starts at 3, stream 0 at 4.
    assert first_step_in_epoch(1, 1, 2, 3) == 3 and first_step_in_epoch(0, 1, 2, 3) == 4
    assert first_step_in_epoch(0, 2, 4, 5) == 12  # epoch 2 starts at 10 (stream 2); stream 0 at 12


def test_corrupt_samples_are_skipped_counted_and_not_replaced(tmp_path, caplog):
    paths, jpgs = make_shards(tmp_path, 1, 8, {"s0/1_0": "truncated_jpeg", "s0/3_0": "bad_json",
                                               "s0/4_0": "no_image"})
    with caplog.at_level(logging.WARNING, logger="gpfm_scale.data.shard_stream"):
        batch = next(_loader(_cfg(paths, batch_size=5, shuffle_buffer=0, open_shards=1, random_start=False)))
    keys = batch_keys(batch)
    assert keys == ["s0/0_0", "s0/2_0", "s0/5_0", "s0/6_0", "s0/7_0"]
    assert batch["stats"] == {"corrupt": 3, "shard_errors": 0, "samples": 5}
    transform = MultiCropTransform(CROPS)
    for i, key in enumerate(keys):  # each row holds its own key's tile, nothing substituted
        expected = transform(decode_jpeg(jpgs[key]), sample_generator(SEED, 0, 0, i))["global_crops_uint8"][0]
        assert torch.equal(batch["global_crops_uint8"][i], expected)
    assert all(k in caplog.text for k in ("s0/1_0", "s0/3_0", "s0/4_0"))


@pytest.mark.parametrize(("where", "kept"), [
    ("inside_member", ["s0/0_0", "s0/1_0", "s0/2_0", "s0/3_0"]),
    # cut right before s0/4_0: s0/3_0 might have had more members, so it goes with the damaged tail
    ("at_boundary", ["s0/0_0", "s0/1_0", "s0/2_0"]),
])
def test_truncated_shard_keeps_what_came_before(tmp_path, caplog, where, kept):
    paths, _ = make_shards(tmp_path, 1, 6)
    with tarfile.open(paths[0]) as tf:
        member = tf.getmember("s0/4_0.jpg")
    cut = member.offset_data + 10 if where == "inside_member" else member.offset
    with open(paths[0], "r+b") as f:
        f.truncate(cut)
    with caplog.at_level(logging.WARNING, logger="gpfm_scale.data.shard_stream"):
        cfg = _cfg(paths, batch_size=len(kept) + 2, shuffle_buffer=0, open_shards=1, random_start=False)
        batch = next(_loader(cfg))
    assert batch_keys(batch) == kept + kept[:2]  # the only shard is drawn again after the damage
    assert batch["stats"]["shard_errors"] == 1 and batch["stats"]["corrupt"] == 0
    assert paths[0] in caplog.text and "truncated" in caplog.text


def _tar_bytes(fmt: int, members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_understands_long_names_and_directories(tmp_path, fmt):
    slide = "TCGA-01.v2" if fmt == tarfile.USTAR_FORMAT else "S" * 130  # ustar cannot hold the long name
    members = [(f"{slide}", None), (f"{slide}/5_7.jpg", b"\xff\xd8x"), (f"{slide}/5_7.json", b"{}"),
               (f"{slide}/9_7.jpg", b"j2")]
    path = tmp_path / "t.tar"
    path.write_bytes(_tar_bytes(fmt, members))
    samples = list(iter_raw_samples(str(path)))
    assert [(s.key, s.files) for s in samples] == [(f"{slide}/5_7", {"jpg": b"\xff\xd8x", "json": b"{}"}),
                                                   (f"{slide}/9_7", {"jpg": b"j2"})]


def test_garbage_file_is_a_shard_error(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ShardError, match="bad.tar"):
        list(iter_raw_samples(str(path)))


def test_fsspec_urls_globs_and_braces(tmp_path):
    paths, jpgs = make_shards(tmp_path, 2, 4)
    root = f"gpfm-test-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            fs.pipe(f"/{root}/run-{i:06d}.tar", f.read())
    braces = expand_shard_urls(f"memory://{root}/run-{{000000..000001}}.tar")
    assert braces == [f"memory://{root}/run-000000.tar", f"memory://{root}/run-000001.tar"]
    globbed = expand_shard_urls([f"memory://{root}/*.tar"])
    assert len(globbed) == 2 and all(u.startswith("memory://") for u in globbed)
    batch = next(_loader(_cfg(globbed, batch_size=8, shuffle_buffer=0)))
    assert set(batch_keys(batch)) <= set(jpgs) and len(set(batch_keys(batch))) >= 4
    with pytest.raises(ConfigError, match="no shard"):
        expand_shard_urls(f"memory://{root}/none-*.tar")


def test_all_corrupt_stops_instead_of_spinning(tmp_path):
    paths, _ = make_shards(tmp_path, 1, 3, {f"s0/{j}_0": "no_image" for j in range(3)})
    with pytest.raises(ShardError, match="corrupt samples in a row"):
        next(_loader(_cfg(paths, max_consecutive_corrupt=5, shuffle_buffer=0)))


def test_config_rejects_unknown_keys_and_auto_resolves_here():
    with pytest.raises(ValueError, match="extra"):
        LoaderSettings(shard="x")  # type: ignore[call-arg]
    cuda_and_dali = torch.cuda.is_available() and _dali_imports()
    assert resolve_backend(_cfg([], backend="auto")) == ("dali" if cuda_and_dali else "torch")


def test_the_seed_and_epoch_length_are_handed_down_not_settings():
    """The loader's seed and epoch length belong to the run (pretraining: run.seed, schedule.iters_per_epoch)."""
    assert {"seed", "epoch_length"}.isdisjoint(LoaderSettings.model_fields)
    bound = LoaderSettings(batch_size=5).bind(seed=11, epoch_length=7)
    assert (bound.seed, bound.epoch_length, bound.batch_size) == (11, 7, 5)
    with pytest.raises(ValueError, match="seed"):
        LoaderConfig(epoch_length=7)  # type: ignore[call-arg]


def _dali_imports() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def test_png_tiles_decode_losslessly_and_json_is_parsed():
    from torchvision.io import encode_png

    tile = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = RawSample(key="s/1_2", shard="x.tar", files={"png": encode_png(tile).numpy().tobytes(),
                                                      "json": b'{"x": 1, "y": 2}'})
    sample = decode_sample(raw)
    assert torch.equal(sample["image"], tile) and sample["json"] == {"x": 1, "y": 2}
    with pytest.raises(CorruptSampleError, match="not an object"):
        decode_sample(RawSample(key="s/1_2", shard="x.tar", files={"png": raw.files["png"], "json": b"[1]"}))


def test_16_bit_png_tiles_train_on_their_high_byte_not_a_wrapped_or_white_image():
    """A 16-bit PNG tile (some scanners' exports) reaches the crops as its 8-bit image: the high byte of each sample."""
    import cv2
    import numpy as np

    rgb16 = np.random.default_rng(0).integers(0, 65536, size=(12, 10, 3), dtype=np.uint16)
    ok, png = cv2.imencode(".png", rgb16[:, :, ::-1])  # cv2 writes BGR
    assert ok
    raw = RawSample(key="s/1_2", shard="x.tar", files={"png": png.tobytes(), "json": b"{}"})
    image = decode_sample(raw)["image"]
    assert image.dtype == torch.uint8
    assert torch.equal(image, torch.from_numpy((rgb16 >> 8).astype(np.uint8)).permute(2, 0, 1))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_random_start_reads_every_sample_once_from_any_byte(tmp_path, fmt):
    """Start at every block of the shard (mid-payload, mid-header chain, end blocks): one cycle yields each sample
    exactly once, in file order rotated; long (130-char) names must not yield a half sample."""
    members = []
    for j in range(6):
        slide = ("L" * 130) if j % 2 else "short"
        members += [(f"{slide}/{j}_0.jpg", bytes([j]) * (300 + 400 * j)), (f"{slide}/{j}_0.json", b"{}")]
    path = tmp_path / "t.tar"
    path.write_bytes(_tar_bytes(fmt, members))
    keys = [name.rsplit(".", 1)[0] for name, _ in members[::2]]
    size = path.stat().st_size
    for block in range(size // 512):
        got = [raw.key for raw in _shard_cycle(str(path), (block * 512 + 100) / size)]
        assert sorted(got) == sorted(keys), block
        assert got == keys[keys.index(got[0]):] + keys[:keys.index(got[0])], block
    assert [raw.key for raw in _shard_cycle(str(path), None)] == keys


def test_validate_shards_lists_corrupt_samples_and_damaged_shards(tmp_path):
    paths, _ = make_shards(tmp_path, 2, 4, {"s0/1_0": "truncated_jpeg", "s1/2_0": "bad_json"})
    with open(paths[1], "r+b") as f:  # cut inside s1/3_0's jpg: s1/0_0..s1/2_0 are read, s1/2_0 is corrupt
        f.truncate(f.seek(0, 2) - 1024 - 1500)
    report = validate_shards(paths)
    assert report.num_samples == 3 + 2 and not report.ok
    assert [r.split(":")[0] for r in report.corrupt] == ["s0/1_0 in " + paths[0], "s1/2_0 in " + paths[1]]
    assert len(report.shard_errors) == 1 and report.shard_errors[0].startswith(paths[1])
