"""The shard writer: valid tars WebDataset reads, rollback leaves no trace, shards seal only at slide boundaries."""

import hashlib
import tarfile

import pytest
import webdataset as wds

from gpfm_scale.contracts.shards import ShardWriter


def _write_slide(w: ShardWriter, sid: str, n: int, size: int = 1000) -> None:
    w.begin_slide()
    for i in range(n):
        w.add(f"{sid}/{i}_0", {"jpg": bytes([i % 256]) * size, "json": b'{"i": %d}' % i})


def test_rollback_truncates_and_hash_matches(tmp_path):
    w = ShardWriter(tmp_path, max_bytes=10**9)
    _write_slide(w, "a", 3)
    assert w.commit_slide("a", 3) is None
    _write_slide(w, "bad", 5)
    w.rollback_slide()
    _write_slide(w, "c", 2)
    w.commit_slide("c", 2)
    sealed = w.seal()
    assert sealed.slide_ids == ["a", "c"] and sealed.num_samples == 5
    data = open(sealed.tmp_path, "rb").read()
    assert hashlib.sha256(data).hexdigest() == sealed.sha256
    with tarfile.open(sealed.tmp_path) as tf:
        names = tf.getnames()
    assert not any(n.startswith("bad/") for n in names)
    assert len(names) == 10


def test_webdataset_reads_keys_with_slash_and_dots(tmp_path):
    w = ShardWriter(tmp_path, max_bytes=10**9)
    _write_slide(w, "TCGA-01.v2", 2)
    w.commit_slide("TCGA-01.v2", 2)
    sealed = w.seal()
    samples = list(wds.WebDataset(sealed.tmp_path, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["TCGA-01.v2/0_0", "TCGA-01.v2/1_0"]
    assert samples[1]["jpg"] == bytes([1]) * 1000 and samples[1]["json"] == b'{"i": 1}'


def test_seals_at_slide_boundary_past_cap(tmp_path):
    w = ShardWriter(tmp_path, max_bytes=6000)
    _write_slide(w, "a", 2)
    assert w.commit_slide("a", 2) is None  # 2 x 2560 B: under the cap
    _write_slide(w, "b", 8)  # crosses the cap mid-slide: the slide is not split
    sealed = w.commit_slide("b", 8)
    assert sealed is not None and sealed.slide_ids == ["a", "b"] and sealed.num_samples == 10
    assert w.seal() is None  # nothing open any more


def test_empty_shard_is_discarded(tmp_path):
    w = ShardWriter(tmp_path, max_bytes=10)
    _write_slide(w, "x", 3)
    w.rollback_slide()
    assert w.seal() is None
    assert list(tmp_path.iterdir()) == []


def test_add_outside_slide_is_an_error(tmp_path):
    w = ShardWriter(tmp_path, max_bytes=10)
    with pytest.raises(RuntimeError):
        w.add("k", {"jpg": b"x"})


def test_fast_tar_header_is_byte_identical_to_tarfile():
    from gpfm_scale.contracts.shards import _slow_header, tar_header

    names = [(f"slide_{i % 7}/{i * 256}_{i * 3}.jpg", 1000 + i * 37) for i in range(2000)]
    names += [("x" * 99 + ".json", 5), ("long/" + "y" * 120 + ".jpg", 10)]  # the last one falls back
    assert all(tar_header(n, size) == _slow_header(n, size) for n, size in names)


def test_sample_key_round_trips_and_a_foreign_key_has_no_coordinates():
    from gpfm_scale.contracts.shards import SHARD_RE, parse_sample_key, sample_key, shard_name

    assert parse_sample_key(sample_key("TCGA-01.a", 1024, 0)) == ("TCGA-01.a", (1024, 0))
    assert parse_sample_key("s1/tile7") == ("s1", None)
    assert SHARD_RE.match(shard_name("run_a", 12)).group("run", "index") == ("run_a", "000012")


@pytest.mark.parametrize("remote", [False, True], ids=["local", "memory"])
def test_list_shards_finds_the_same_shards_from_every_way_of_naming_them(tmp_path, remote):
    import fsspec

    from gpfm_scale.contracts.shards import list_shards

    root = f"memory://{tmp_path}/run" if remote else str(tmp_path / "run")
    fs, base = fsspec.core.url_to_fs(root)
    fs.makedirs(f"{base}/shards", exist_ok=True)
    for name in ("tiles-000001.tar", "tiles-000000.tar", ".tiles-000002.tar", "notes.txt"):
        fs.pipe_file(f"{base}/shards/{name}", b"x")
    shards = [f"{root}/shards/tiles-000000.tar", f"{root}/shards/tiles-000001.tar"]
    assert list_shards(root) == shards  # the tiler's output directory
    assert list_shards(f"{root}/shards") == shards
    assert list_shards(f"{root}/shards/*.tar") == shards  # (the hidden in-flight file is never a shard)
    assert list_shards(f"{root}/shards/tiles-000001.tar") == shards[1:]
    assert list_shards(f"{root}/nothing") == []
