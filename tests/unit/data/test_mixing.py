"""`gpfm-scale mix`: every tile once, byte for byte; batches from mixed shards mix slides; the loader's exact resume
and rank streams hold over mixed shards; damage reported; finished or overlapping outputs refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from gpfm_scale.atomic import default_file_mode
from gpfm_scale.cli import main
from gpfm_scale.contracts.shards import ShardWriter
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.loader_config import LoaderConfig
from gpfm_scale.data.mixing import MixConfig, bucket_of, run
from gpfm_scale.data.shard_stream import build_loader
from gpfm_scale.data.tar_samples import iter_raw_samples
from gpfm_scale.errors import ConfigError
from tests.unit.data.shard_helpers import batch_keys, make_cohort

CROPS = CropConfig(global_size=16, local_size=8, n_local=1)
GRID = (2, 2)
TILES = [4 + (7 * i) % 9 for i in range(24)]  # 24 slides of 4..12 tiles, 6 whole slides per tiler shard


def _samples(paths: list[str]) -> Counter:
    """(key, members) of every sample of `paths`, as a multiset."""
    return Counter((raw.key, tuple(sorted(raw.files.items()))) for p in paths for raw in iter_raw_samples(p))


def _shards(out: Path) -> list[str]:
    return sorted(str(p) for p in (out / "shards").glob("*.tar"))


def _shard_bytes(paths: list[str], n: int) -> int:
    return sum(os.path.getsize(p) for p in paths) // n + 1


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    paths, _ = make_cohort(root, TILES, slides_per_shard=6)
    return root, paths


@pytest.fixture(scope="module")
def mixed(cohort, ray_session, tmp_path_factory):
    root, paths = cohort
    out = tmp_path_factory.mktemp("mixed") / "out"
    result = run(MixConfig(seed=3, shard_bytes=_shard_bytes(paths, 3)), str(root), str(out))
    return out, result


def test_every_tile_lands_once_byte_for_byte_in_whole_shards(cohort, mixed):
    _, paths = cohort
    out, result = mixed
    shards = _shards(out)
    assert [Path(p).name for p in shards] == [f"mixed-{i:06d}.tar" for i in range(3)]
    assert _samples(shards) == _samples(paths)
    assert result.ok and result.n_samples == sum(TILES) and result.n_shards == 3 and result.n_inputs == len(paths)
    manifest = json.loads((out / "mix.json").read_text())
    for record, path in zip(manifest["shards"], shards):
        data = Path(path).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["bytes"] == len(data)
        keys = [raw.key for raw in iter_raw_samples(path)]
        assert record["samples"] == len(keys)
        assert {bucket_of(k, 3, 3) for k in keys} == {int(Path(path).stem.split("-")[1])}
    assert [r["samples"] for r in manifest["inputs"]] == [sum(TILES[i:i + 6]) for i in range(0, 24, 6)]
    assert not (out / "shards" / ".tmp").exists()
    for path in [out / "mix.json", *map(Path, shards)]:  # readable by the lab's group, as open() would make them
        assert path.stat().st_mode & 0o777 == default_file_mode(), path


def _cfg(shards: list[str], **over) -> LoaderConfig:
    base = {"shards": shards, "backend": "torch", "batch_size": 16, "num_workers": 0, "shuffle_buffer": 0,
            "open_shards": 1, "random_start": False, "epoch_length": 4, "seed": 5}
    return LoaderConfig(**{**base, **over})


def _slides_per_batch(cfg: LoaderConfig, n: int) -> list[int]:
    it = build_loader(cfg, CROPS, MaskConfig(), GRID, 0, 1)
    return [len({k.split("/")[0] for k in batch_keys(next(it))}) for _ in range(n)]


def test_batches_from_mixed_shards_mix_the_cohort(cohort, mixed):
    """Same loader settings: a 16-tile batch read in order from a tiler shard holds 2-3 slides; from a mixed
    shard about the uniform expectation (24 slides of 4..12 tiles: ~10.6 distinct)."""
    _, paths = cohort
    out, _ = mixed
    before = _slides_per_batch(_cfg(paths), 8)
    after = _slides_per_batch(_cfg(_shards(out)), 8)
    assert max(before) <= 4
    assert sum(after) / len(after) >= 8 and min(after) > max(before)


@pytest.mark.parametrize(("workers", "start"), [(2, 5), (0, 3)])
def test_resume_over_mixed_shards_gives_the_uninterrupted_batches(mixed, workers, start):
    out, _ = mixed
    cfg = _cfg(_shards(out), batch_size=4, num_workers=workers, shuffle_buffer=8, open_shards=2, random_start=True,
               epoch_length=3)
    full = build_loader(cfg, CROPS, MaskConfig(), GRID, 1, 2)
    reference = [batch_keys(next(full)) for _ in range(start + 3)]
    resumed = build_loader(cfg, CROPS, MaskConfig(), GRID, 1, 2, start_step=start)
    assert [batch_keys(next(resumed)) for _ in range(3)] == reference[start:]


def test_ranks_read_their_own_streams_that_cover_the_mixed_cohort(cohort, mixed):
    """The loader resamples shards per (seed, rank, worker) (no split: any shard count serves any world size):
    ranks differ, and as each drawn shard is read once around, a few shard draws reach every tile."""
    out, _ = mixed
    cfg = _cfg(_shards(out), batch_size=8, shuffle_buffer=8, random_start=True, epoch_length=100)
    seen = {}
    for rank in (0, 1):
        it = build_loader(cfg, CROPS, MaskConfig(), GRID, rank, 2)
        seen[rank] = [batch_keys(next(it)) for _ in range(40)]
    assert seen[0][0] != seen[1][0]
    assert {k for batches in seen.values() for keys in batches for k in keys} == {
        key for key, _ in _samples(cohort[1])}


def test_rerun_after_a_killed_mix_writes_the_same_bytes_and_clears_leftovers(cohort, mixed, tmp_path):
    root, paths = cohort
    out, _ = mixed
    again = tmp_path / "again"
    (again / "shards" / ".tmp").mkdir(parents=True)
    (again / "shards" / "mixed-000007.tar").write_bytes(b"left by a killed run")
    (again / "shards" / ".tmp" / "x.tar").write_bytes(b"half written")
    run(MixConfig(seed=3, shard_bytes=_shard_bytes(paths, 3)), str(root), str(again))
    assert [Path(p).read_bytes() for p in _shards(again)] == [Path(p).read_bytes() for p in _shards(out)]


def test_damaged_input_keeps_its_head_and_is_reported(cohort, tmp_path, capsys):
    """CLI: a shard cut inside its tail, a sample with a duplicate member, a shard's slides given twice: the mix
    keeps what came before the cut, drops the malformed sample and the second copy of each key, finishes, names
    every problem and exits 1."""
    _, paths = cohort
    src = tmp_path / "in"
    src.mkdir()
    cut = shutil.copy(paths[0], src / "tiles-000000.tar")
    with open(cut, "r+b") as f:
        f.truncate(f.seek(0, 2) - 3000)
    writer = ShardWriter(tmp_path / "tmp", max_bytes=10**9)
    writer.begin_slide()
    writer.add("dup/0_0", {"jpg": b"first"})
    writer.add("dup/0_0", {"jpg": b"second", "json": b"{}"})
    writer.add("dup/1_0", {"jpg": b"fine", "json": b"{}"})
    writer.commit_slide("dup", 3)
    os.replace(writer.seal().tmp_path, src / "tiles-000001.tar")
    shutil.copy(paths[1], src / "tiles-000002.tar")
    shutil.copy(paths[1], src / "again-000000.tar")  # the same slides tiled twice: every key met twice
    rc = main(["mix", "--shards", str(src), "--out", str(tmp_path / "out"), "--shard-bytes", "100000"])
    err = capsys.readouterr().err
    assert rc == 1 and "tiles-000000.tar" in err and "truncated" in err and "dup/0_0" in err
    assert "duplicate member" in err and err.count("duplicate key") == sum(TILES[6:12])
    got = _samples(_shards(tmp_path / "out"))
    twice, head = _samples([paths[1]]), _samples([paths[0]])
    from_cut = got - twice - Counter({("dup/1_0", (("jpg", b"fine"), ("json", b"{}"))): 1})
    assert sum(got.values()) == sum(from_cut.values()) + sum(twice.values()) + 1  # each key once, dup/0_0 dropped
    assert from_cut <= head and 0 < sum(from_cut.values()) < sum(head.values())


def test_refuses_a_finished_mix_inputs_inside_out_and_no_inputs(cohort, mixed, tmp_path, capsys):
    root, _ = cohort
    out, _ = mixed
    with pytest.raises(ConfigError, match="already holds a finished mix"):
        run(MixConfig(), str(root), str(out))
    with pytest.raises(ConfigError, match="mix into another --out"):
        run(MixConfig(), str(root), str(root))  # the tiler's own output dir: a later shards/*.tar would take both
    assert main(["mix", "--shards", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "o")]) == 2
    assert "no shard found" in capsys.readouterr().err
