"""The features contract between `embed` and `evaluate` (DESIGN.md "Features").

Layout of an embedding output directory DIR:
    DIR/features/{slide_id}.h5   one per slide: `features` (N, D) float16 (or float32), `coords` (N, 2) int64 level-0 (x, y)
                                 (CLAM/TRIDENT layout: their MIL code reads `features` and `coords` unchanged),
                                 attributes `model`, `dim`, `slide_id`.
    DIR/features/images.h5       for an image folder: `features` (N, D) float16 (or float32) and `paths` (N,) of the images.
    DIR/parts/{slide_id}/*.npz   scratch: per-batch features written by the inference actors (`sink.py`), joined
                                 into the slide's .h5 and removed; wiped at the start and end of every run.
    DIR/index.parquet            one row per slide (kind "slide") or per image (kind "image"): `slide_id`,
                                 `kind`, `file` (relative to DIR), `row` (the image's row in images.h5, -1 for
                                 slides), `n` (vectors), `label`, `case_id`, `time`, `event` (when known) and
                                 every other column of the input manifest, carried through.
Features are stored as float16 by default (half the disk of float32; probes and MIL upcast on load), float32 on
request (`feature_dtype`).

Paths: a slide id becomes a file name only through `names.child_path` (one safe component under `features/`), and
the index's `file` column is read back the same way, so neither a tar key nor an edited index reaches outside DIR.
Readers refuse non-finite features (GpfmError naming the files): every metric computed on them would be NaN.
Files appear whole (written under a temporary name, then renamed) with the umask's mode (`gpfm_scale.atomic`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from gpfm_scale.atomic import replace_into_place, write_bytes_atomic
from gpfm_scale.errors import GpfmError, UnsafeNameError
from gpfm_scale.names import checked_component, child_path

INDEX = "index.parquet"
IMAGES_FILE = "features/images.h5"


@dataclass(frozen=True)
class Bag:
    """One slide's features for MIL: [N, D] float32 plus its coordinates and clinical fields."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    row: dict[str, Any]


def write_slide_features(directory: str | Path, slide_id: str, features: np.ndarray, coords: np.ndarray,
                         model: str, attrs: dict[str, Any] | None = None,
                         coords_attrs: dict[str, Any] | None = None) -> str:
    """Atomically write DIR/features/{slide_id}.h5; returns its path relative to DIR.

    `attrs` adds file attributes (the embed stage records its resume bookkeeping there); `coords_attrs` go on the
    `coords` dataset (the tiler's CLAM/TRIDENT geometry: patch_size, patch_level, ...), as TRIDENT expects."""
    if len(features) != len(coords):
        raise GpfmError(f"{slide_id}: {len(features)} feature vectors for {len(coords)} coordinates")
    rel = f"features/{checked_component(slide_id, 'slide id')}.h5"
    Path(directory, "features").mkdir(parents=True, exist_ok=True)
    path = Path(child_path(str(directory), "features", f"{slide_id}.h5"))
    tmp = path.with_suffix(".h5.partial")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=_stored(features))
        ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        ds.attrs.update(coords_attrs or {})
        f.attrs.update({"model": model, "dim": int(features.shape[1]) if features.ndim == 2 else 0,
                        "slide_id": slide_id})
        f.attrs.update(attrs or {})
    replace_into_place(str(tmp), str(path))
    return rel


def write_image_features(directory: str | Path, features: np.ndarray, paths: list[str], model: str) -> str:
    rel = IMAGES_FILE
    path = Path(directory) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".h5.partial")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=_stored(features))
        f.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype())
        f.attrs.update({"model": model, "dim": int(features.shape[1])})
    replace_into_place(str(tmp), str(path))
    return rel


def _stored(features: np.ndarray) -> np.ndarray:
    """Features as they go to disk: float32 kept when the run chose it (`EmbedConfig.feature_dtype`), any other
    dtype as float16, the default."""
    array = np.asarray(features)
    return array if array.dtype == np.float32 else array.astype(np.float16)


class ImageFeatureWriter:
    """`write_image_features`' layout written incrementally, for cohorts of images too big to hold at once.

    Rows are appended in arrival order (`append` returns each batch's first row) into `images.h5.partial`;
    `close` renames it into place, so a killed run never leaves a torn images.h5.
    """

    def __init__(self, directory: str | Path, model: str, dim: int, attrs: dict[str, Any] | None = None,
                 dtype: str = "float16") -> None:
        self.path = Path(directory) / IMAGES_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_suffix(".h5.partial")
        self.file = h5py.File(self.tmp, "w")
        self.features = self.file.create_dataset("features", shape=(0, dim), maxshape=(None, dim),
                                                 dtype=np.dtype(dtype), chunks=(256, dim))
        self.paths = self.file.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
                                              chunks=(1024,))
        self.file.attrs.update({"model": model, "dim": dim} | (attrs or {}))
        self.n = 0

    def append(self, features: np.ndarray, paths: list[str]) -> int:
        first, self.n = self.n, self.n + len(paths)
        self.features.resize(self.n, axis=0)
        self.paths.resize(self.n, axis=0)
        self.features[first:self.n] = np.asarray(features, dtype=self.features.dtype)
        self.paths[first:self.n] = np.asarray(paths, dtype=object)
        return first

    def abort(self) -> None:
        """Drop the partial file (the run failed): nothing half-written is left for a reader."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def close(self, attrs: dict[str, Any] | None = None) -> str:
        """Add final attributes (counts known only at the end), then rename into place; returns the file."""
        self.file.attrs.update(attrs or {})
        self.file.close()
        replace_into_place(str(self.tmp), str(self.path))
        return IMAGES_FILE


def write_parquet(path: str | Path, table: pd.DataFrame) -> Path:
    """Atomic parquet write (index and failure tables: small enough to build in memory)."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    write_bytes_atomic(str(path), buffer.getvalue())
    return Path(path)


def write_index(directory: str | Path, rows: list[dict[str, Any]]) -> Path:
    return write_parquet(Path(directory) / INDEX, pd.DataFrame(rows))


def read_index(directory: str | Path) -> pd.DataFrame:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise GpfmError(f"{directory} has no {INDEX}: not an embedding output (run gpfm-scale embed first)")
    return pd.read_parquet(path)


def model_name(directory: str | Path) -> str:
    """The model an embedding directory was made with (from its first feature file), else the folder name."""
    index = read_index(directory)
    if len(index):
        with h5py.File(feature_file(directory, index["file"].iloc[0])) as f:
            return str(f.attrs.get("model", Path(directory).name))
    return Path(directory).name


def load_image_features(directory: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """(features [N, D] float32, index rows of kind "image" in the same order)."""
    index = read_index(directory)
    rows = index[index["kind"] == "image"].reset_index(drop=True)
    if rows.empty:
        raise GpfmError(f"{directory}: no image features (patch tasks need an image-folder embedding)")
    with h5py.File(Path(directory) / IMAGES_FILE) as f:
        feats = f["features"][:]
    feats = feats[rows["row"].to_numpy()].astype(np.float32)
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise GpfmError(f"{Path(directory) / IMAGES_FILE}: {int(bad.sum())} of {len(feats)} feature rows are not "
                        f"finite (NaN/inf), e.g. {rows.loc[bad, 'slide_id'].head(3).tolist()}: re-embed them")
    return feats, rows


def feature_file(directory: str | Path, rel: str) -> Path:
    """DIR/features/NAME for an index `file` cell; UnsafeNameError for any other form (an edited index)."""
    parts = str(rel).split("/")
    if len(parts) != 2 or parts[0] != "features":
        raise UnsafeNameError(f"{directory}/{INDEX}: file {rel!r} is not features/NAME")
    return Path(child_path(str(directory), *parts))


def iter_slide_bags(directory: str | Path) -> Iterator[Bag]:
    """Every slide's bag of tile features, in index order (unchecked: see `check_finite_bags`)."""
    index = read_index(directory)
    for row in index[index["kind"] == "slide"].to_dict("records"):
        with h5py.File(feature_file(directory, row["file"])) as f:
            yield Bag(row["slide_id"], f["features"][:].astype(np.float32), f["coords"][:], row)


def check_finite_bags(directory: str | Path, bags: list[Bag]) -> None:
    """GpfmError naming every feature file of `bags` with a non-finite row."""
    bad = [f"{b.row['file']} ({int((~np.isfinite(b.features).all(axis=1)).sum())} rows)" for b in bags
           if not np.isfinite(b.features).all()]
    if bad:
        raise GpfmError(f"{directory}: non-finite (NaN/inf) features in {len(bad)} file(s): "
                        f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: re-embed those slides")
