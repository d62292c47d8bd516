"""Pretraining with --out on s3:// (a moto S3 server started by the test) stopped after a checkpoint and resumed
with --resume equals an uninterrupted run into another prefix of the bucket: the resumed run's workers get their
state back through Ray Train's own restore from the bucket (its checkpoint manager snapshot and the checkpoint
objects, read through the same fsspec filesystem), rank 0 cuts the bucket's metrics.jsonl back to the checkpoint,
and the export is the same tensor for tensor."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpfm_scale import storage
from gpfm_scale.contracts.export import WEIGHTS_FILE, load_exported
from gpfm_scale.train.stage import run
from tests.integration.pretrain_helpers import tiny_config, write_tile_shards

pytestmark = pytest.mark.usefixtures("ray_with_bucket")

# The fewest steps that cross a checkpoint and go on; one worker, since starting Ray Train's processes is most of a
# run's time here (the local resume test covers two ranks' checkpoint shards).
BASE = {"run.total_iters": 4, "run.checkpoint_every": 2, "run.num_workers": 1}
TIMINGS = {"step_s", "data_wait_s", "expert_wait_s", "images_per_s_worker", "images_per_s"}


def _upload_shards(local: Path, prefix: str) -> str:
    """The local shards uploaded under `prefix`/shards; returns `prefix` (a tiler output, as `--shards` takes)."""
    for path in sorted((local / "shards").glob("*.tar")):
        storage.upload_file(str(path), storage.join(prefix, "shards", path.name))
    return prefix


def _rows(out: str) -> list[dict]:
    """metrics.jsonl's rows without their timings: losses, grad norms, schedules, counters, resumed_from."""
    rows = [json.loads(line) for line in storage.read_bytes(storage.join(out, "metrics.jsonl")).splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def _leave_rows_past_the_checkpoint(out: str, step: int) -> None:
    """What a run killed after its last checkpoint leaves in the bucket: a row of a later step, then a torn one."""
    later = json.dumps({"step": step, "total": -1.0, "resumed_from": 0}) + "\n"
    storage.append_bytes(storage.join(out, "metrics.jsonl"), (later + '{"step": %d, "to' % (step + 1)).encode())


def test_run_stopped_and_resumed_on_a_bucket_matches_an_uninterrupted_one(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a relative path would appear here as ./s3:/...
    root = storage.join(s3_bucket.url, "resume")
    shards = _upload_shards(write_tile_shards(tmp_path / "local", n_shards=2, per_shard=16), root)
    full, split = storage.join(root, "full"), storage.join(root, "split")

    run(tiny_config(**BASE), full, shards=shards)
    stopped = run(tiny_config(**BASE, **{"run.stop_after_steps": 2}), split, shards=shards)
    assert stopped.steps == 2 and storage.isdir(stopped.checkpoint)  # an s3:// URL: no local copy exists
    assert not storage.exists(storage.join(split, "export"))
    _leave_rows_past_the_checkpoint(split, 3)
    # keep one checkpoint: Ray Train deletes the first run's from the bucket once the resumed run's is registered
    resumed = run(tiny_config(**BASE, **{"run.keep_checkpoints": 1}), split, shards=shards, resume=True)

    run_dir = storage.join(split, "checkpoints", "tiny")
    assert resumed.steps == 4 and resumed.checkpoint.startswith(storage.join(run_dir, ""))
    assert [n for n in storage.listdir(run_dir) if storage.isdir(storage.join(run_dir, n))] == [
        posixpath.basename(resumed.checkpoint)]
    a, b = _rows(full), _rows(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # each step once: the stale row 3 and the torn line are gone
    assert [r["resumed_from"] for r in b] == [0, 0, 2, 2]  # steps 3-4 ran from the checkpoint in the bucket
    assert [{**r, "resumed_from": 0} for r in b] == a  # the rest exactly: the same arithmetic, step for step
    exports = [storage.local_mirror(storage.join(out, "export")) for out in (full, split)]
    (_, config_a), (_, config_b) = (load_exported(e) for e in exports)
    assert config_a == config_b and config_b["step"] == 4
    names = sorted(os.listdir(exports[0]))
    assert names == sorted(os.listdir(exports[1])) and WEIGHTS_FILE in names
    for name in (n for n in names if n.endswith(".safetensors")):  # the teacher backbone, its heads for warm starts
        tensors_a, tensors_b = (load_file(os.path.join(e, name)) for e in exports)
        assert tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a), name
    assert os.listdir(tmp_path) == ["local"]  # nothing written to local paths by mistake
