"""Turn `--slides PATH` into a slide table: a manifest (CSV/Parquet), a folder, or a glob; local or fsspec URLs.

A DICOM whole-slide image is a series of .dcm files (one per level): in a folder listing, the .dcm files of one
folder are one slide whose path is that folder and whose id is the folder's name.
The table has `slide_id, path` and optionally `mpp` plus any clinical columns, which are carried into the run
manifest. Slide ids must be unique and safe as file names (they name the coordinate file and the WebDataset key):
ids are mapped with `gpfm_scale.names.safe_id`, and one that stays unsafe ('.', '..', hidden) refuses the table.
The `mpp` column is passed through as read: each value is parsed per slide (`slides.mpp.parse_manifest_mpp`) so
that one bad cell fails that slide with the reason, instead of being dropped silently for the slide's metadata.
"""

from __future__ import annotations

import posixpath

import fsspec
import pandas as pd

from gpfm_scale.errors import ConfigError, UnsafeNameError
from gpfm_scale.names import safe_id
from gpfm_scale.slides.reader import SLIDE_SUFFIXES


def _join(base_url: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return posixpath.join(posixpath.dirname(base_url), path)


def _read_table(url: str) -> pd.DataFrame:
    """The manifest as a frame; a missing, empty or unparseable file is a ConfigError naming it."""
    try:
        with fsspec.open(url, "rb") as f:
            if url.endswith(".parquet"):
                return pd.read_parquet(f)
            return pd.read_csv(f)
    except FileNotFoundError:
        raise ConfigError(f"slide manifest not found: {url}") from None
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{url}: slide manifest is empty (expected a header with slide_id, path)") from None
    except IsADirectoryError:
        raise ConfigError(f"{url}: slide manifest is a directory, not a CSV/Parquet file") from None
    except (ValueError, OSError) as err:  # pandas ParserError / UnicodeDecodeError / pyarrow ArrowInvalid
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{url}: not a readable {'Parquet' if url.endswith('.parquet') else 'CSV'} "
                          f"slide manifest: {first}") from None


def _safe_ids(raw: list, spec: str) -> list[str]:
    ids = []
    for value in raw:
        if value is None or (isinstance(value, float) and value != value):
            raise ConfigError(f"{spec}: a row has an empty slide_id")
        try:
            ids.append(safe_id(str(value)))
        except UnsafeNameError as err:
            raise ConfigError(f"{spec}: slide id {str(value)!r} cannot name files: {err}") from None
    return ids


def _list_files(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if any(ch in root for ch in "*?["):
        found = fs.glob(root)
    else:
        found = [p for p in fs.find(root) if p.lower().endswith(SLIDE_SUFFIXES)]
    files = [p for p in found if fs.isfile(p)]
    dicom_dirs = {posixpath.dirname(p) for p in files if p.lower().endswith(".dcm")}
    found = sorted([p for p in files if not p.lower().endswith(".dcm")] + list(dicom_dirs))
    if protocol in ("file", "local"):
        return found
    return [fs.unstrip_protocol(p) for p in found]


def load_slide_table(spec: str) -> pd.DataFrame:
    """Read the slide list; raises ConfigError with the reason when it is empty, malformed or ambiguous."""
    if spec.endswith((".csv", ".parquet")):
        df = _read_table(spec)
        missing = {"slide_id", "path"} - set(df.columns)
        if "path" in missing:
            raise ConfigError(f"{spec}: slide manifest needs a 'path' column (has {list(df.columns)})")
        if "slide_id" in missing:
            df["slide_id"] = [posixpath.splitext(posixpath.basename(str(p)))[0] for p in df["path"]]
        df["path"] = [_join(spec, str(p)) for p in df["path"]]
    else:
        paths = _list_files(spec)
        if not paths:
            raise ConfigError(f"no slides found at {spec} (looked for {', '.join(SLIDE_SUFFIXES)})")
        df = pd.DataFrame({"slide_id": [posixpath.splitext(posixpath.basename(p))[0] for p in paths], "path": paths})
    if df.empty:
        raise ConfigError(f"{spec}: no slides listed")
    df["slide_id"] = _safe_ids(df["slide_id"].tolist(), spec)
    dup = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dup:
        raise ConfigError(f"{spec}: slide ids are not unique (after making them file-safe): {dup[:5]}")
    cols = ["slide_id", "path"] + [c for c in df.columns if c not in ("slide_id", "path")]
    return df[cols].reset_index(drop=True)
