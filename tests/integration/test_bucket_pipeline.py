"""tile -> pretrain -> embed -> evaluate with every input and output on s3:// (a moto S3 server started by the
test, s3fs as the client): slides are read from the bucket, and shards, checkpoints, the export, metrics, features,
the index and the report are written there, by the Ray workers as well as by the driver, and nothing lands on
local disk under a mangled "s3:" path. Ray's workers get the bucket's credentials and endpoint from the job's
runtime_env (`ray_with_bucket`), as a user's job does on a cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from gpfm_scale import storage
from gpfm_scale.config import build_config, load_config
from gpfm_scale.demo.stages import TINY_YAML
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.stage import run as run_embed
from gpfm_scale.contracts.features import iter_slide_bags
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.stage import run as run_evaluate
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import run as run_tiling
from gpfm_scale.train.pretrain_config import PretrainConfig
from gpfm_scale.train.stage import run as run_pretraining
from tests.integration.tiling_helpers import make_cohort

SPLITS = ["train", "train", "val", "test", "test"]  # labels alternate a/b: train and test hold both classes
# (make_cohort's seeds 0-4 all show tissue at its default size; seeds 5 and 6 do not)


def _upload_cohort(local_manifest: Path, bucket: str) -> str:
    """The cohort's slides and a manifest naming their s3:// URLs, in the bucket; returns the manifest's URL."""
    table = pd.read_csv(local_manifest)
    urls = []
    for path in table["path"]:
        url = storage.join(bucket, "slides", Path(path).name)
        storage.upload_file(path, url)
        urls.append(url)
    table["path"], table["split"] = urls, SPLITS
    manifest = storage.join(bucket, "slides", "manifest.csv")
    storage.write_bytes(manifest, table.to_csv(index=False).encode())
    return manifest


def test_tile_pretrain_embed_evaluate_with_everything_on_s3(ray_with_bucket, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a relative path would appear here as ./s3:/...
    root = storage.join(s3_bucket.url, "run1")
    manifest = _upload_cohort(make_cohort(tmp_path / "cohort", len(SPLITS)), root)

    tiles = storage.join(root, "tiles")
    tiled = run_tiling(build_config(TilingConfig, {"grid": {"tile_px": 32, "target_mpp": 0.5,
                                                            "max_tiles_per_slide": 6}}, "test"), manifest, tiles)
    assert (tiled.n_done, tiled.n_failed, tiled.no_tiles) == (len(SPLITS), 0, [])
    shards = [n for n in storage.listdir(storage.join(tiles, "shards")) if n.endswith(".tar")]
    assert shards and storage.isfile(storage.join(tiles, "manifest.parquet"))

    pcfg = load_config(PretrainConfig, TINY_YAML, {
        "run.num_workers": 1, "run.total_iters": 2, "run.checkpoint_every": 2, "run.log_every": 1,
        "run.name": "s3run", "loader.batch_size": 4, "objective.model.experts": []})
    pretrain_out = storage.join(root, "pretrain")
    trained = run_pretraining(pcfg, pretrain_out, shards=tiles)
    assert trained.steps == 2 and trained.export_dir == storage.join(pretrain_out, "export")
    assert trained.checkpoint and storage.isdir(trained.checkpoint)
    assert trained.checkpoint.startswith(storage.join(pretrain_out, "checkpoints", "s3run", ""))
    rows = [json.loads(line) for line in storage.read_bytes(storage.join(pretrain_out, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert storage.isfile(storage.join(pretrain_out, "config.yaml"))
    assert storage.isfile(storage.join(pretrain_out, ".generation"))
    export_config = json.loads(storage.read_bytes(storage.join(trained.export_dir, "config.json")))
    assert export_config["step"] == 2 and storage.isfile(storage.join(trained.export_dir, "model.safetensors"))

    embed_out = storage.join(root, "embed")
    embedded = run_embed(build_config(EmbedConfig, {"batch_size": 16}, "test"), trained.export_dir, tiles, embed_out)
    assert (embedded.n_done, embedded.n_failed, embedded.model) == (len(SPLITS), 0, "teacher:pretrain@step2")
    assert embedded.index == storage.join(embed_out, "index.parquet")
    assert storage.listdir(storage.join(embed_out, "parts")) == []  # the workers' scratch is gone
    bags = list(iter_slide_bags(embed_out))
    assert len(bags) == len(SPLITS) and all(b.features.shape[1] == 64 for b in bags)
    assert sorted(b.row["split"] for b in bags) == sorted(SPLITS)  # the manifest's columns reached the index

    ecfg = build_config(EvaluateConfig, {"bootstrap": 0, "slide": {"train": {
        "max_epochs": 2, "min_epochs": 0, "device": "cpu"}, "model": {"hidden_dim": 16, "attention_dim": 8}}}, "test")
    evaluated = run_evaluate(ecfg, [embed_out], ["abmil"], storage.join(root, "eval"))
    assert evaluated.results_json == storage.join(root, "eval", "results.json")
    results = json.loads(storage.read_bytes(evaluated.results_json))
    assert "abmil" in json.dumps(results)
    assert storage.read_bytes(evaluated.report_md).startswith(b"#")
    assert os.listdir(tmp_path) == ["cohort"]  # nothing written to local paths by mistake
