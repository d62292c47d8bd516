"""Turn `--slides PATH` into a slide table: a manifest (CSV/Parquet), a folder, or a glob; local or fsspec URLs.

The table has `slide_id, path` and optionally `mpp` plus any clinical columns, which are carried into the run
manifest. Slide ids must be unique and safe as file names (they name the coordinate file and the WebDataset key).
"""

from __future__ import annotations

import posixpath
import re

import fsspec
import pandas as pd

from gpfm_scale.errors import ConfigError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_slide_id(name: str) -> str:
    """File- and WebDataset-key-safe id: anything outside [A-Za-z0-9._-] becomes '_'."""
    return _UNSAFE.sub("_", name)


def _join(base_url: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return posixpath.join(posixpath.dirname(base_url), path)


def _read_table(url: str) -> pd.DataFrame:
    with fsspec.open(url, "rb") as f:
        if url.endswith(".parquet"):
            return pd.read_parquet(f)
        return pd.read_csv(f)


def _list_files(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if any(ch in root for ch in "*?["):
        found = fs.glob(root)
    else:
        found = [p for p in fs.find(root) if p.lower().endswith(SLIDE_SUFFIXES)]
    found = sorted(p for p in found if fs.isfile(p))
    if protocol in ("file", "local"):
        return found
    return [fs.unstrip_protocol(p) for p in found]


def load_slide_table(spec: str) -> pd.DataFrame:
    """Read the slide list; raises ConfigError with the reason when it is empty, malformed or ambiguous."""
    if spec.endswith((".csv", ".parquet")):
        try:
            df = _read_table(spec)
        except FileNotFoundError:
            raise ConfigError(f"slide manifest not found: {spec}") from None
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
    df["slide_id"] = [safe_slide_id(str(s)) for s in df["slide_id"]]
    dup = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dup:
        raise ConfigError(f"{spec}: slide ids are not unique (after making them file-safe): {dup[:5]}")
    if "mpp" in df.columns:
        df["mpp"] = pd.to_numeric(df["mpp"], errors="coerce")
    cols = ["slide_id", "path"] + [c for c in df.columns if c not in ("slide_id", "path")]
    return df[cols].reset_index(drop=True)
