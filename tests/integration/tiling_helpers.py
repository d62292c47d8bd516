"""Reading a tiling run back: every sample of every committed shard, and the slides that made them."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds
from PIL import Image

from gpfm_scale.slides.synthetic import write_synthetic_slide


def read_samples(out: Path) -> list[dict]:
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False)) if shards else []


def tile_set(out: Path) -> dict[str, str]:
    """key -> sha256 of the tile bytes; fails on a duplicated key (a tile written twice)."""
    found: dict[str, str] = {}
    for s in read_samples(out):
        payload = s.get("jpg") or s.get("png")
        assert s["__key__"] not in found, f"duplicate tile {s['__key__']}"
        found[s["__key__"]] = hashlib.sha256(payload).hexdigest()
    return found


def decode(payload: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def make_cohort(folder: Path, n: int, size: tuple[int, int] = (2048, 1536), tile: int = 256) -> Path:
    """n small two-class synthetic slides and a manifest CSV listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"s{i:02d}.svs"
        write_synthetic_slide(path, *size, mpp=0.25, tile=tile, levels=2, seed=i)
        rows.append({"slide_id": path.stem, "path": str(path), "label": "ab"[i % 2]})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
