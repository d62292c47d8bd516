"""Tiny WebDataset shards in the tiler's layout, for the loader tests (48-px synthetic H&E tiles)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import simplejpeg
import torch

from gpfm_scale.contracts.shards import ShardWriter
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles


def encode_jpeg(tile: torch.Tensor) -> bytes:
    """uint8 [3, H, W] -> JPEG bytes (q90, 4:2:0 as the tiler writes)."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(tile.permute(1, 2, 0).numpy()), quality=90,
                                  colorspace="RGB", colorsubsampling="420")


def decode_jpeg(data: bytes) -> torch.Tensor:
    return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)


def sample_files(key: str, jpg: bytes, kind: str = "ok") -> dict[str, bytes]:
    """Members of one sample; kind damages it: truncated_jpeg, bad_json, no_image."""
    slide, xy = key.split("/")
    meta = json.dumps({"slide_id": slide, "x": int(xy.split("_")[0]), "y": 0}).encode()
    if kind == "truncated_jpeg":
        return {"jpg": jpg[: len(jpg) // 2], "json": meta}
    if kind == "bad_json":
        return {"jpg": jpg, "json": b"{not json"}
    if kind == "no_image":
        return {"json": meta}
    return {"jpg": jpg, "json": meta}


def make_shards(root: Path, n_shards: int, per_shard: int, damaged: dict[str, str] | None = None,
                size: int = 48) -> tuple[list[str], dict[str, bytes]]:
    """`n_shards` shards `root/shards/run-NNNNNN.tar` of one slide each ("s{i}", keys "s{i}/{j}_0").

    Returns the shard paths and the JPEG bytes of every key (before any damage).
    """
    damaged = damaged or {}
    tiles, _ = make_two_class_tiles(n_shards * per_shard, size, seed=0)
    out = root / "shards"
    out.mkdir(parents=True, exist_ok=True)
    paths, jpgs = [], {}
    for s in range(n_shards):
        writer = ShardWriter(root / "tmp", max_bytes=10**9)
        writer.begin_slide()
        for j in range(per_shard):
            key = f"s{s}/{j}_0"
            jpgs[key] = encode_jpeg(tiles[s * per_shard + j])
            writer.add(key, sample_files(key, jpgs[key], damaged.get(key, "ok")))
        writer.commit_slide(f"s{s}", per_shard)
        sealed = writer.seal()
        path = out / f"run-{s:06d}.tar"
        os.replace(sealed.tmp_path, path)
        paths.append(str(path))
    return paths, jpgs


def batch_keys(batch: dict) -> list[str]:
    return [m["__key__"] for m in batch["meta"]]


def make_cohort(root: Path, tiles_per_slide: list[int], slides_per_shard: int, size: int = 16,
                run: str = "tiles") -> tuple[list[str], dict[str, bytes]]:
    """Shards in the tiler's layout: slide after slide ("c{i}", keys "c{i}/{j}_0"), `slides_per_shard` whole
    slides per shard `root/shards/{run}-NNNNNN.tar`, written with the tiler's ShardWriter.

    Returns the shard paths and the JPEG bytes of every key.
    """
    tiles, _ = make_two_class_tiles(sum(tiles_per_slide), size, seed=1)
    out = root / "shards"
    out.mkdir(parents=True, exist_ok=True)
    paths, jpgs, t = [], {}, 0
    for first in range(0, len(tiles_per_slide), slides_per_shard):
        writer = ShardWriter(root / "tmp", max_bytes=10**9)
        for s in range(first, min(first + slides_per_shard, len(tiles_per_slide))):
            writer.begin_slide()
            for j in range(tiles_per_slide[s]):
                key = f"c{s}/{j}_0"
                jpgs[key] = encode_jpeg(tiles[t])
                t += 1
                writer.add(key, sample_files(key, jpgs[key]))
            writer.commit_slide(f"c{s}", tiles_per_slide[s])
        sealed = writer.seal()
        path = out / f"{run}-{len(paths):06d}.tar"
        os.replace(sealed.tmp_path, path)
        paths.append(str(path))
    return paths, jpgs
