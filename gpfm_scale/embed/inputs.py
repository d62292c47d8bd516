"""What `--input` is, and the work it holds: tiler shards (with or without the tiler's manifest), a slide manifest
(tiled first), or an image folder.

Detection (`input_kind: auto`), first match wins:
1. a directory with `shards/` or `manifest.parquet` of a tiling run, a `.tar`, a glob of `.tar`s, or a directory
   of `.tar`s: tiles;
2. a `.csv` / `.parquet` file: a slide manifest, unless it is a tiling run's manifest (it has `status`, `n_tiles`
   and `shards`): then its directory's tiles;
3. a directory holding `.png` / `.jpg` / `.jpeg` / `.bmp` images (flat or in class folders): images;
4. a directory holding whole-slide files (`.svs .ndpi .mrxs ...`): slides.
`.tif` / `.tiff` alone are ambiguous (BACH patches vs pyramidal slides): an image folder when it has a
`labels.csv`, otherwise `input_kind` must be given.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow.parquet as pq

from gpfm_scale.contracts.run_manifest import MANIFEST_NAME, extra_columns, read_state
from gpfm_scale.contracts.shards import list_shards
from gpfm_scale.embed.config import InputKind
from gpfm_scale.errors import ConfigError, UnsafeNameError
from gpfm_scale.names import checked_component
from gpfm_scale.slides.reader import SLIDE_SUFFIXES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
AMBIGUOUS_SUFFIXES = (".tif", ".tiff")
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class TileSource:
    """Shards to embed and, for a tiling run, its manifest (one row per slide: status, n_tiles, shards, extras)."""

    shards: list[str]
    manifest: pd.DataFrame | None
    extra_columns: list[str]
    root: str | None

    def shard_url(self, name: str) -> str:
        return posixpath.join(self.root, "shards", name) if self.root else name


def _is_tiler_manifest(url: str) -> bool:
    if not url.endswith(".parquet"):
        return False
    with fsspec.open(url, "rb") as f:
        names = set(pq.read_schema(f).names)
    return {"status", "n_tiles", "shards"} <= names


def _suffixes(root: Path) -> set[str]:
    return {p.suffix.lower() for p in root.rglob("*") if p.is_file()}


def detect_kind(path: str, kind: InputKind) -> InputKind:
    """The input's kind (see the module docstring); ConfigError when it cannot be told."""
    if kind != "auto":
        return kind
    fs, local = fsspec.core.url_to_fs(path)
    if path.endswith(".tar") or any(ch in path for ch in "*?["):
        return "tiles"
    if path.endswith((".csv", ".parquet")):
        return "tiles" if _is_tiler_manifest(path) else "slides"
    if not fs.isdir(local):
        raise ConfigError(f"--input {path}: not found (expected shards, a slide manifest or an image folder)")
    if fs.isdir(posixpath.join(local, "shards")) or fs.isfile(posixpath.join(local, MANIFEST_NAME)):
        return "tiles"
    if any(p.endswith(".tar") for p in fs.ls(local, detail=False)):
        return "tiles"
    found = _suffixes(Path(local))
    if found & set(IMAGE_SUFFIXES):
        return "images"
    if found & (set(SLIDE_SUFFIXES) - set(AMBIGUOUS_SUFFIXES)):
        return "slides"
    if found & set(AMBIGUOUS_SUFFIXES):
        if (Path(local) / LABELS_FILE).is_file():
            return "images"
        raise ConfigError(f"--input {path}: .tif files may be patches or slides; set input_kind: images or slides")
    raise ConfigError(f"--input {path}: no shards, slides or images found")


def _isfile(url: str) -> bool:
    fs, local = fsspec.core.url_to_fs(url)
    return fs.isfile(local)


def _read_manifest(url: str) -> pd.DataFrame:
    """The tiler's current state: its compacted manifest.parquet plus the journal records after it (a tiling run
    commits by journal append, so the parquet alone can lag behind what is done)."""
    state = read_state(posixpath.dirname(url))
    if state is None:
        raise ConfigError(f"--input {url}: not found")
    return state


def load_tile_source(path: str) -> TileSource:
    """Shards of a tiling run (its directory or manifest) or bare shards (a .tar, a glob, a folder of .tars).
    Bare shards whose folder is `RUN/shards` use `RUN/manifest.parquet` when it exists."""
    path = path.rstrip("/")
    fs, local = fsspec.core.url_to_fs(path)
    if path.endswith(MANIFEST_NAME):
        root = posixpath.dirname(path)
    elif fs.isdir(local) and (fs.isdir(posixpath.join(local, "shards")) or
                              fs.isfile(posixpath.join(local, MANIFEST_NAME))):
        root = path
    else:
        shards = list_shards(path)
        if not shards:
            raise ConfigError(f"--input {path}: no .tar shards found")
        folder = posixpath.dirname(shards[0])
        parent = posixpath.dirname(folder)
        if posixpath.basename(folder) == "shards" and _isfile(posixpath.join(parent, MANIFEST_NAME)):
            manifest = _read_manifest(posixpath.join(parent, MANIFEST_NAME))
            return TileSource(shards, manifest, extra_columns(manifest), parent)
        return TileSource(shards, None, [], None)
    if not _isfile(posixpath.join(root, MANIFEST_NAME)):
        raise ConfigError(f"--input {path}: a tiling output needs {MANIFEST_NAME} (is the tiling run finished?)")
    manifest = _read_manifest(posixpath.join(root, MANIFEST_NAME))
    # a name that is not one safe component fails its slide in the stage (`_unsafe_names`), never becomes a path
    shards = sorted({posixpath.join(root, "shards", s) for lst in manifest["shards"] for s in shard_names(lst)
                     if _is_component(s)})
    return TileSource(shards, manifest, extra_columns(manifest), root)


def _is_component(name: str) -> bool:
    try:
        checked_component(name)
    except UnsafeNameError:
        return False
    return True


def shard_names(value: object) -> list[str]:
    """A manifest `shards` cell (list, numpy array or None) as a list of names."""
    return [] if value is None else [str(v) for v in value]


def list_image_folder(root: str) -> pd.DataFrame:
    """One row per image under `root`, sorted: `file` (relative path), `label`, plus `labels.csv` columns.

    The label is the first folder under `root` (`class/image.png`, the CRC-100K / BACH layout); images at the top
    level take `label` (or `class`) from `labels.csv` (`file` column = path relative to `root`).
    """
    base = Path(root)
    suffixes = IMAGE_SUFFIXES + AMBIGUOUS_SUFFIXES
    files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                   if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ConfigError(f"--input {root}: no images ({', '.join(suffixes)})")
    table = pd.DataFrame({"file": files, "label": [f.split("/")[0] if "/" in f else None for f in files]})
    labels_path = base / LABELS_FILE
    if labels_path.is_file():
        extra = pd.read_csv(labels_path)
        if "file" not in extra.columns:
            raise ConfigError(f"{labels_path}: needs a 'file' column (image path relative to {root})")
        extra = extra.drop_duplicates("file").rename(columns={"label": "label_csv"})
        table = table.merge(extra, on="file", how="left")
        fallback = table["label_csv"] if "label_csv" in table.columns else table.get("class")
        if fallback is not None:
            table["label"] = table["label"].fillna(fallback)
        table = table.drop(columns=[c for c in ("label_csv",) if c in table.columns])
    if table["label"].isna().any():
        missing = table.loc[table["label"].isna(), "file"].tolist()
        raise ConfigError(f"--input {root}: no class for {missing[:3]} (put images in class folders or list them "
                          f"in {LABELS_FILE} with a label/class column)")
    return table
