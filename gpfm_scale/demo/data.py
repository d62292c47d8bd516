"""The demo's inputs: synthetic slides with known tissue classes, the real slide, and two labelled patch folders.

Labelled patches (ImageFolder layout `class/image`, plus `labels.csv`), one folder per evaluation dataset:
- `synthetic-tissue`: the tiler's own tiles of the synthetic slides, labelled by the class that covers most of
  each tile's tissue (computed by the code that drew the pixels, so exact); mixed tiles are left out. The split
  is by slide (`split` column): the last synthetic slide is the test set, so no test tile shares a slide with a
  training tile.
- `hgsc-nuclei`: a class-balanced seeded subset of the real nucleus crops of ../shared/data/hgsc-nuclei, copied
  (the demo folder stays self-contained). Split at random by the evaluation stage: the crops come from two
  images only, so neighbouring crops are correlated and the numbers are optimistic (the data README says so).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gpfm_scale.data.tar_samples import iter_raw_samples
from gpfm_scale.demo.config import DemoConfig
from gpfm_scale.embed.inputs import LABELS_FILE, list_image_folder
from gpfm_scale.errors import GpfmError
from gpfm_scale.slides._synthetic_content import SlideContent, build_content
from gpfm_scale.slides.synthetic import write_synthetic_slide

log = logging.getLogger(__name__)

REAL_SLIDE = "cmu-1-small-region.svs"
HGSC = "hgsc-nuclei"
DATA_CANDIDATES = ("../shared/data", "shared/data")


def find_data_dir(cfg: DemoConfig) -> Path | None:
    """The shared real-data folder: the config's, else GPFM_DATA_DIR, else ../shared/data beside the repository."""
    given = cfg.data_dir or os.environ.get("GPFM_DATA_DIR")
    candidates = [given] if given else list(DATA_CANDIDATES)
    return next((Path(c).resolve() for c in candidates if Path(c).is_dir()), None)


def synthetic_seed(cfg: DemoConfig, i: int) -> int:
    return 100 * cfg.seed + 100 + i


def write_demo_slides(folder: Path, cfg: DemoConfig) -> Path:
    """Synthetic slides (each with every tissue class) plus the real slide when present; returns the manifest CSV.

    Existing slide files are kept (a rerun with the same settings writes the same bytes anyway)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(cfg.n_synthetic_slides):
        path = folder / f"synthetic-{i}.svs"
        if not path.exists():
            write_synthetic_slide(path, cfg.slide_width, cfg.slide_height, mpp=cfg.slide_mpp,
                                  tile=cfg.tiling.grid.tile_px, levels=3, seed=synthetic_seed(cfg, i),
                                  classes=tuple(cfg.tissue_classes))
        rows.append({"slide_id": path.stem, "path": str(path), "case_id": f"case-{i}"})
    data = find_data_dir(cfg)
    real = data / REAL_SLIDE if data else None
    if cfg.include_real_slide and real is not None and real.is_file():
        rows.append({"slide_id": real.stem, "path": str(real), "case_id": "cmu-1"})
    elif cfg.include_real_slide:
        log.warning("real slide %s not found (data folder: %s); the demo uses synthetic slides only", REAL_SLIDE, data)
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _tile_label(content: SlideContent, meta: dict[str, Any], cfg: DemoConfig) -> str | None:
    """The class covering at least `min_class_fraction` of the tile's tissue pixels, else None (mixed or empty)."""
    size0 = round(meta["tile_px"] * meta["mpp"] / cfg.slide_mpp)
    labels = content.label_region(int(meta["x"]), int(meta["y"]), size0, size0)
    counts = np.bincount(labels.ravel(), minlength=len(cfg.tissue_classes) + 1)[1:]
    if counts.sum() == 0 or counts.max() < cfg.min_class_fraction * counts.sum():
        return None
    return cfg.tissue_classes[int(np.argmax(counts))]


def write_synthetic_patches(tiles_dir: Path, folder: Path, cfg: DemoConfig) -> Path:
    """`folder/{class}/{slide}_{x}_{y}.jpg` from the tiler's shards (tile bytes copied) + labels.csv with the split.

    Returns `folder`. Each class is capped at `patches_per_class` (seeded draw over all slides, so the split
    proportions are kept on average)."""
    contents = {f"synthetic-{i}": build_content(cfg.slide_width, cfg.slide_height, cfg.slide_mpp,
                                                synthetic_seed(cfg, i), len(cfg.tissue_classes))
                for i in range(cfg.n_synthetic_slides)}
    test_slide = f"synthetic-{cfg.n_synthetic_slides - 1}"
    rows, payloads = [], {}
    for shard in sorted((tiles_dir / "shards").glob("*.tar")):
        for raw in iter_raw_samples(str(shard)):
            meta = json.loads(raw.files["json"])
            content = contents.get(meta["slide_id"])
            ext = "jpg" if "jpg" in raw.files else "png"
            label = _tile_label(content, meta, cfg) if content is not None else None
            if label is None:
                continue
            name = f"{label}/{meta['slide_id']}_{meta['x']}_{meta['y']}.{ext}"
            payloads[name] = raw.files[ext]
            rows.append({"file": name, "label": label, "case_id": meta["slide_id"],
                         "split": "test" if meta["slide_id"] == test_slide else "train"})
    table = _cap_per_class(pd.DataFrame(rows, columns=["file", "label", "case_id", "split"]), cfg)
    _check_classes(table, cfg)
    if folder.exists():
        shutil.rmtree(folder)
    for name in table["file"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(payloads[name])
    table.to_csv(folder / LABELS_FILE, index=False)
    log.info("synthetic-tissue patches: %s", table.groupby(["split", "label"]).size().to_dict())
    return folder


def _check_classes(table: pd.DataFrame, cfg: DemoConfig) -> None:
    """Every class needs training and test tiles, or the probes have nothing to learn or nothing to score."""
    counts = table.groupby(["label", "split"]).size()
    short = [f"{c} ({s})" for c in cfg.tissue_classes for s in ("train", "test") if counts.get((c, s), 0) < 2]
    if short:
        raise GpfmError(f"synthetic slides too small: fewer than 2 single-class tiles of {', '.join(short)}; raise "
                        "slide_width/slide_height or n_synthetic_slides, or lower min_class_fraction")


def _cap_per_class(table: pd.DataFrame, cfg: DemoConfig) -> pd.DataFrame:
    """At most `patches_per_class` rows per label (seeded), sorted by file for a stable order."""
    if cfg.patches_per_class is not None:
        table = table.sample(frac=1.0, random_state=cfg.seed).groupby("label").head(cfg.patches_per_class)
    return table.sort_values("file").reset_index(drop=True)


def write_hgsc_subset(source: Path, folder: Path, cfg: DemoConfig) -> Path:
    """A seeded class-balanced subset of the hgsc-nuclei crops copied to `folder`, with a labels.csv of file and
    label only (the source's `source_image` is dropped: two images are too few groups for a grouped split)."""
    table = list_image_folder(str(source))[["file", "label"]]
    table = _cap_per_class(table, cfg)
    if folder.exists():
        shutil.rmtree(folder)
    for name in table["file"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, folder / name)
    table.to_csv(folder / LABELS_FILE, index=False)
    log.info("hgsc-nuclei patches: %s", table.groupby("label").size().to_dict())
    return folder
