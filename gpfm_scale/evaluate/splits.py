"""From an embedding index to labelled train/val/test features: `--labels` overrides, sample order, splits.

Splits, in order of precedence:
1. the index's split column (`split` in {train, val, test}); without a val part, val is carved from train;
2. a grouped, stratified split when the group column (`case_id` by default; e.g. `source_image` for crops cut
   from a few large images) is in the index: rows sharing a group stay together (crops of one image are
   correlated, and letting them straddle train and test inflates every number);
3. a stratified split of rows, with a WARNING (logged, in `PatchData.split_warning` and so in the report): without
   a case/patient/source-image column, augmented copies or crops of one image land on both sides of the split.
Rows are sorted by sample id before splitting, so every model embedded from the same images gets the same
split whatever order its embedding job wrote them in: model comparisons stay paired.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from gpfm_scale.errors import ConfigError, GpfmError
from gpfm_scale.evaluate.config import SplitConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABEL_KEYS = ("slide_id", "image", "file", "path")
INDEX_KEYS = ("slide_id", "path", "image")


@dataclass(frozen=True)
class PatchData:
    """Labelled patch features of one model: features [N, D] float32, labels [N] int64 in [0, C)."""

    features: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    split: np.ndarray
    ids: np.ndarray
    split_warning: str | None = None  # set when rows were split independently (`independent_split_warning`)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(features [n, D], labels [n]) of one split."""
        mask = self.split == name
        return self.features[mask], self.labels[mask]


def read_label_table(path: str | Path) -> pd.DataFrame:
    """A `--labels` file (CSV or Parquet) with a key column (slide_id, image, file or path) and label columns.

    A `class` column is read as `label` when there is no `label` column (the hgsc-nuclei labels.csv layout).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--labels file not found: {path}")
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    key = next((c for c in LABEL_KEYS if c in table.columns), None)
    if key is None:
        raise ConfigError(f"{path}: needs one of the key columns {', '.join(LABEL_KEYS)}; has {list(table.columns)}")
    if "label" not in table.columns and "class" in table.columns:
        table = table.rename(columns={"class": "label"})
    return table.rename(columns={key: "_key"})


def _variants(key: str) -> list[str]:
    """Path suffixes of a key, longest first, each with and without its extension."""
    parts = PurePosixPath(str(key).replace("\\", "/").lstrip("./")).parts
    out = []
    for i in range(len(parts)):
        suffix = PurePosixPath(*parts[i:])
        out += [str(suffix), str(suffix.with_suffix(""))]
    return out


def apply_label_table(index: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Index rows with the label table's columns overriding theirs, matched by id or by path suffix.

    A label key matches an index row when it equals the row's slide_id / path / image column or a path suffix
    of it (`connective/nest_0002.png` matches `/data/hgsc-nuclei/connective/nest_0002.png`). Keys shared by
    two label rows are ambiguous and never match. Unmatched index rows keep their own values.
    """
    lookup: dict[str, int | None] = {}
    for i, key in enumerate(table["_key"].astype(str)):
        for v in _variants(key):
            lookup[v] = None if v in lookup and lookup[v] != i else i
    matches = []
    for row in index.itertuples(index=False):
        found = None
        for col in INDEX_KEYS:
            value = getattr(row, col, None)
            if isinstance(value, str) and found is None:
                found = next((lookup[v] for v in _variants(value) if lookup.get(v) is not None), None)
        matches.append(found)
    matched = np.array([m is not None for m in matches])
    if not matched.any():
        raise GpfmError("no row of the --labels file matches the embedding index (keys: slide_id, image, file, path)")
    if not matched.all():
        log.warning("--labels: %d of %d index rows have no entry and keep their own labels",
                    int((~matched).sum()), len(index))
    out = index.copy()
    extra = table.drop(columns="_key")
    rows = extra.iloc[[m for m in matches if m is not None]].reset_index(drop=True)
    for col in extra.columns:
        if col not in out.columns:
            out[col] = None
        out[col] = out[col].astype(object)
        out.loc[matched, col] = rows[col].to_numpy(dtype=object)
    return out


def sample_ids(index: pd.DataFrame) -> np.ndarray:
    """A unique id per row: slide_id, else path, else the row position (with a warning: no stable order)."""
    for col in INDEX_KEYS:
        if col in index.columns and index[col].notna().all() and index[col].is_unique:
            return index[col].astype(str).to_numpy()
    log.warning("index has no unique id column (%s): the split follows row order", ", ".join(INDEX_KEYS))
    return np.array([f"{i:09d}" for i in range(len(index))])


def _stratify(y: np.ndarray) -> np.ndarray | None:
    _, counts = np.unique(y, return_counts=True)
    return y if counts.min() >= 2 else None


def _random_split(y: np.ndarray, cfg: SplitConfig, seed: int) -> np.ndarray:
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=cfg.test, stratify=_stratify(y), random_state=seed)
    split = np.full(len(y), "train", dtype=object)
    split[test] = "test"
    if cfg.val > 0:
        _, val = train_test_split(rest, test_size=cfg.val / (cfg.train + cfg.val), stratify=_stratify(y[rest]),
                                  random_state=seed)
        split[val] = "val"
    return split


def _take_fold(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int, what: str) -> np.ndarray:
    """Indices of one fold holding about `fraction` of the rows, whole groups only, classes balanced."""
    n_splits = max(2, round(1 / fraction))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ConfigError(f"split.group_column has {n_groups} groups; a grouped {what} fraction of {fraction:.2f} "
                          f"needs at least {n_splits}: set split.group_column to null (rows split independently) "
                          "or provide a split column")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return next(folds.split(np.zeros(len(y)), y, groups))[1]


def _grouped_split(y: np.ndarray, groups: np.ndarray, cfg: SplitConfig, seed: int) -> np.ndarray:
    split = np.full(len(y), "train", dtype=object)
    test = _take_fold(y, groups, cfg.test, seed, "test")
    split[test] = "test"
    if cfg.val > 0:
        rest = np.flatnonzero(split == "train")
        val = _take_fold(y[rest], groups[rest], cfg.val / (cfg.train + cfg.val), seed, "val")
        split[rest[val]] = "val"
    return split


def _given_split(values: pd.Series, y: np.ndarray, cfg: SplitConfig, seed: int) -> np.ndarray:
    split = values.astype(str).str.lower().to_numpy(dtype=object)
    bad = sorted(set(split) - set(SPLITS))
    if bad:
        raise GpfmError(f"split column {cfg.split_column!r} has values {bad}; expected train, val, test")
    if not (split == "val").any() and cfg.val > 0:
        train = np.flatnonzero(split == "train")
        _, val = train_test_split(train, test_size=cfg.val / (cfg.train + cfg.val), stratify=_stratify(y[train]),
                                  random_state=seed)
        split[val] = "val"
        log.info("split column has no val rows: %d train rows moved to val", len(val))
    return split


def leakage_warning(unit: str, reason: str) -> str:
    """The one wording of the leak warning, for patch rows and slides alike."""
    return (f"{unit} split independently ({reason}): augmented copies or crops of one source image, or slides of one "
            "patient, can land in both train and test and inflate every number; set split.group_column to the "
            "case/patient/source-image column or give a split column")


def independent_split_warning(index: pd.DataFrame, cfg: SplitConfig) -> str | None:
    """Why `assign_splits` splits these rows independently (None when a split or group column is used)."""
    if cfg.split_column in index.columns and index[cfg.split_column].notna().all():
        return None
    if not cfg.group_column:
        return leakage_warning("patch rows are", "split.group_column is null")
    if cfg.group_column not in index.columns:
        return leakage_warning("patch rows are", f"the index has no {cfg.group_column!r} column")
    missing = int(index[cfg.group_column].isna().sum())
    if missing:
        return leakage_warning("patch rows are", f"{missing} of {len(index)} rows have no {cfg.group_column!r}")
    return None


def assign_splits(index: pd.DataFrame, y: np.ndarray, cfg: SplitConfig, seed: int) -> np.ndarray:
    """[N] "train" / "val" / "test" for index rows with class indices y [N] (precedence in the module docstring)."""
    if cfg.split_column in index.columns and index[cfg.split_column].notna().all():
        split = _given_split(index[cfg.split_column], y, cfg, seed)
    elif (warning := independent_split_warning(index, cfg)) is None:
        split = _grouped_split(y, index[cfg.group_column].astype(str).to_numpy(), cfg, seed)
    else:
        log.warning("%s", warning)
        split = _random_split(y, cfg, seed)
    for name in ("train", "test"):
        if not (split == name).any():
            raise GpfmError(f"the {name} split is empty")
    return split


def prepare_patch_data(features: np.ndarray, index: pd.DataFrame, cfg: SplitConfig, seed: int) -> PatchData:
    """Drop unlabelled rows, sort by sample id, map labels to class indices (classes sorted by name), split."""
    if "label" not in index.columns:
        raise GpfmError("the embedding index has no label column: pass --labels FILE")
    labelled = index["label"].notna().to_numpy()
    if not labelled.all():
        log.warning("%d of %d images have no label and are left out", int((~labelled).sum()), len(index))
    index = index[labelled].reset_index(drop=True)
    features = features[labelled]
    ids = sample_ids(index)
    order = np.argsort(ids, kind="stable")
    index, features, ids = index.iloc[order].reset_index(drop=True), features[order], ids[order]
    names = index["label"].astype(str).to_numpy()
    classes = tuple(sorted(set(names)))
    if len(classes) < 2:
        raise GpfmError(f"patch tasks need at least two classes, found {list(classes)}")
    y = np.searchsorted(np.array(classes), names).astype(np.int64)
    split = assign_splits(index, y, cfg, seed)
    counts = {s: int((split == s).sum()) for s in SPLITS}
    log.info("patch data: %d samples, %d classes, split %s", len(y), len(classes), counts)
    return PatchData(np.ascontiguousarray(features, dtype=np.float32), y, classes, split, ids,
                     independent_split_warning(index, cfg))
