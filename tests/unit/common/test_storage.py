"""Outputs on a bucket (a moto S3 server, s3fs as the client) and relative outputs inside a Ray job (issue 12.5).

No Ray here: the pieces each stage calls, on a real S3 API: the pretraining run's fencing token, the checks a
fresh run and a resume make on --out, metrics.jsonl, the worker-written feature parts and the published .h5, the
index the evaluate stage reads; and the refusal of a relative --out in a submitted job.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest

from gpfm_scale import storage
from gpfm_scale.cli import main
from gpfm_scale.config import dump_config
from gpfm_scale.contracts import features as store
from gpfm_scale.embed.sink import PartWriter, clear_scratch, publish_slide
from gpfm_scale.errors import ConfigError
from gpfm_scale.train import worker
from gpfm_scale.train.fencing import RunFence, SupersededRunError
from gpfm_scale.train.resume import check_out, truncate_metrics, write_run_config
from gpfm_scale.train.stage import resolve_shards
from tests.integration.pretrain_helpers import tiny_config

JOB_ENV = {storage.JOB_CONFIG_ENV: json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_x"}})}


@pytest.fixture
def out(s3_bucket) -> str:
    """A fresh prefix in the session's bucket."""
    return storage.join(s3_bucket.url, f"t-{uuid.uuid4().hex[:8]}")


def test_a_relative_out_inside_a_ray_job_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(storage.JOB_CONFIG_ENV, JOB_ENV[storage.JOB_CONFIG_ENV])
    slides = tmp_path / "slides.csv"
    slides.write_text("slide_id,path\n")
    assert main(["tile", "--slides", str(slides), "--out", "run1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out 'run1' is relative" in err and "raysubmit_x" in err
    assert "temporary working directory" in err
    assert os.listdir(tmp_path) == ["slides.csv"]  # nothing made in the job's working dir
    for cmd in (["embed", "--model", "timm:vit_tiny_patch16_224", "--input", str(tmp_path)],
                ["evaluate", "--features", str(tmp_path), "--task", "knn"]):
        assert main([*cmd, "--out", "rel/out"]) == 2
        assert "--out 'rel/out' is relative" in capsys.readouterr().err


def test_absolute_paths_and_urls_pass_inside_a_job_and_relative_ones_outside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.JOB_CONFIG_ENV, raising=False)
    assert storage.resolve_out("rel") == str(tmp_path / "rel")
    monkeypatch.setenv(storage.JOB_CONFIG_ENV, JOB_ENV[storage.JOB_CONFIG_ENV])
    assert storage.resolve_out("/data/run1") == "/data/run1"
    assert storage.resolve_out("s3://bucket/run1/") == "s3://bucket/run1"
    with pytest.raises(ConfigError, match="relative"):
        storage.resolve_out("file://rel")


def test_fencing_token_on_a_bucket_stops_the_superseded_run(out):
    old = RunFence.start(out)
    old.check("anything")  # it owns --out
    new = RunFence.start(out)
    assert storage.read_bytes(storage.join(out, ".generation")).decode() == new.generation
    with pytest.raises(SupersededRunError, match="taken over"):
        worker._append_metrics(old, {"step": 3, "total": 1.0})
    assert not storage.exists(storage.join(out, "metrics.jsonl"))
    worker._append_metrics(new, {"step": 3, "total": 1.0})
    worker._append_metrics(new, {"step": 4, "total": 0.5})
    rows = storage.read_bytes(storage.join(out, "metrics.jsonl")).splitlines()
    assert [json.loads(r)["step"] for r in rows] == [3, 4]
    assert truncate_metrics(storage.join(out, "metrics.jsonl"), 3) == 1
    assert [json.loads(r)["step"] for r in storage.read_bytes(storage.join(out, "metrics.jsonl")).splitlines()] == [3]


def test_run_checks_see_checkpoints_and_config_on_a_bucket(out):
    cfg = tiny_config()
    check_out(out, cfg, resume=False)  # empty prefix: a fresh run may start
    write_run_config(out, cfg)
    storage.write_bytes(storage.join(out, "checkpoints", cfg.run.name, "checkpoint_000000", "ds", "x"), b"state")
    with pytest.raises(ConfigError, match="pass --resume"):
        check_out(out, cfg, resume=False)
    check_out(out, cfg, resume=True)  # same trajectory: accepted
    changed = cfg.model_copy(deep=True)
    changed.run.seed += 1
    with pytest.raises(ConfigError, match="run.seed"):
        check_out(out, changed, resume=True)
    storage.write_bytes(storage.join(out, "config.yaml"), dump_config(cfg).encode() + b"\n  - : [")
    with pytest.raises(ConfigError, match=f"{out}/config.yaml"):  # the object is named, not a local copy
        check_out(out, cfg, resume=True)


def test_feature_parts_and_slide_files_are_written_to_a_bucket_and_read_back(out):
    writer = PartWriter(out)
    batch = {"slide_id": np.array(["a", "a", "a"]), "index": np.array([2, 0, 1]), "x": np.array([20, 0, 10]),
             "y": np.array([2, 0, 1]), "ok": np.ones(3, bool), "error": np.array(["", "", ""]),
             "total": np.full(3, -1), "features": np.arange(6, dtype=np.float16).reshape(3, 2)}
    summary = writer.summarise(batch)
    part = str(summary["part"][0])
    assert storage.listdir(storage.join(out, "parts", "a")) == [part]
    file, reason = publish_slide(out, "a", [part], 3, "m", {"n_expected": 3}, {})
    assert (file, reason) == ("features/a.h5", "")
    assert storage.listdir(storage.join(out, "parts")) == []  # the slide's parts are gone once published
    store.write_index(out, [{"slide_id": "a", "kind": "slide", "file": file, "row": -1, "n": 3, "label": "x"}])
    (bag,) = store.iter_slide_bags(out)
    assert bag.coords.tolist() == [[0, 0], [10, 1], [20, 2]]  # shard order
    assert bag.features.tolist() == [[2, 3], [4, 5], [0, 1]]
    assert store.model_name(out) == "m"
    writer.summarise({**batch, "slide_id": np.array(["b", "b", "b"])})
    clear_scratch(out)
    assert not storage.exists(storage.join(out, "parts"))


def test_pretraining_finds_the_shards_of_a_tiling_output_on_a_bucket(out):
    for name in ("run-000001.tar", "run-000000.tar"):
        storage.write_bytes(storage.join(out, "shards", name), b"")
    storage.write_bytes(storage.join(out, "manifest.parquet"), b"")
    expected = [storage.join(out, "shards", n) for n in ("run-000000.tar", "run-000001.tar")]
    assert resolve_shards(out) == expected
    assert resolve_shards(storage.join(out, "shards", "*.tar")) == expected
    with pytest.raises(ConfigError, match="no shards found"):
        resolve_shards(storage.join(out, "nothing"))


def test_a_checkpoint_ray_train_reports_on_a_bucket_is_given_back_as_its_url(out, tmp_path):
    path, _ = storage.ray_storage(storage.join(out, "checkpoints"))
    assert not path.startswith("s3:")  # Ray Train is given, and reports, the bucket's paths without the scheme
    reported = f"{path}/tiny/checkpoint_000001"
    assert storage.from_ray_path(out, reported) == storage.join(out, "checkpoints", "tiny", "checkpoint_000001")
    assert storage.from_ray_path(str(tmp_path), str(tmp_path / "c")) == str(tmp_path / "c")
