"""Shards of synthetic two-class tiles and the tiny pretraining config used by the pretraining tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import simplejpeg

from gpfm_scale.config import apply_overrides, build_config, read_yaml
from gpfm_scale.contracts.shards import ShardWriter
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles
from gpfm_scale.train.pretrain_config import PretrainConfig

TINY_YAML = Path(__file__).resolve().parents[2] / "gpfm_scale" / "configs" / "tiny.yaml"


def write_tile_shards(root: Path, n_shards: int = 4, per_shard: int = 32, size: int = 48) -> Path:
    """`root/shards/tiles-NNNNNN.tar`, one synthetic slide per shard; returns root."""
    tiles, labels = make_two_class_tiles(n_shards * per_shard, size, seed=0)
    writer = ShardWriter(root / "tmp", max_bytes=1)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        writer.begin_slide()
        for j in range(per_shard):
            i = s * per_shard + j
            rgb = np.ascontiguousarray(tiles[i].permute(1, 2, 0).numpy())
            meta = {"slide_id": f"s{s}", "x": j * size, "y": 0, "label": int(labels[i])}
            writer.add(f"s{s}/{j * size}_0", {"jpg": simplejpeg.encode_jpeg(rgb, quality=90),
                                              "json": json.dumps(meta).encode()})
        sealed = writer.commit_slide(f"s{s}", per_shard)
        Path(sealed.tmp_path).rename(root / "shards" / f"tiles-{s:06d}.tar")
    return root


def tiny_config(**overrides) -> PretrainConfig:
    """tiny.yaml with dotted overrides (e.g. {"run.total_iters": 12})."""
    return build_config(PretrainConfig, apply_overrides(read_yaml(TINY_YAML), overrides), "tiny.yaml")


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
