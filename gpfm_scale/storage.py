"""Where stages read and write: a local path or any fsspec URL (s3://, gs://, ...), through one set of helpers.

Why one module: every stage writes small files (configs, indexes, fencing tokens, metrics rows) and big ones
(shards, checkpoints, feature files), and the local and object-store ways of making them appear whole differ. A
local file is written under a temporary name in its directory and renamed (`gpfm_scale.atomic`: fsynced, umask's
mode). An object store has no rename (s3fs's `mv` is a copy + delete, a window where both or a torn reader can
exist), but an object appears whole when its upload ends (one PUT, or a multipart upload completed at once), so
remote files are written whole from memory or from a finished local file, never appended or edited in place.
Appending (metrics.jsonl) on a bucket therefore rewrites the object: a few MB at GPFM scale, once per logged step.

Credentials and endpoints are fsspec's / botocore's own (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL; GOOGLE_APPLICATION_CREDENTIALS), read in every process that opens a URL,
Ray workers included: on a cluster they come from the node's environment or the job's runtime_env
(docs/cluster.md "Buckets"). A filesystem object handed to Ray Train pickles as its constructor arguments and is
rebuilt on each worker from that worker's environment, so no secret travels through Ray.

Relative output paths are refused inside a Ray job (`resolve_out`): a submitted job's entrypoint runs in a
temporary working directory that Ray deletes, so `--out run1` would vanish with it.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gpfm_scale import atomic
from gpfm_scale.errors import ConfigError
from gpfm_scale.names import checked_component, child_path

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the environment of a submitted job's entrypoint (`ray job submit`)."""


def is_url(path: str) -> bool:
    """True for a remote fsspec URL (s3://, gs://, memory://...); local paths and file:// URLs are local."""
    return "://" in str(path) and not str(path).startswith("file://")


def url_to_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a local path or URL. A remote filesystem's listing cache is dropped:
    other processes (Ray workers) write under the same prefixes, and a stale listing would hide their files."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache()
    return fs, path


def join(base: str, *parts: str) -> str:
    """`base/part/...`: posix joining for URLs, os.path for local paths."""
    return posixpath.join(str(base), *parts) if is_url(base) else os.path.join(str(base), *parts)


def child(root: str, *parts: str) -> str:
    """`root/part/...` with each part one safe path component (`names`), for data-derived names."""
    if not is_url(root):
        return child_path(str(root), *parts)
    for p in parts:
        checked_component(p, "path component")
    return join(root, *parts)


def submitted_job() -> str | None:
    """The submission id of the Ray job this process is the entrypoint of, or None outside a submitted job."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        metadata = {}
    return str(metadata.get("job_submission_id") or metadata.get("job_name") or "unknown")


def resolve_out(path: str, what: str = "--out") -> str:
    """An output location as every process must see it: URLs unchanged, local paths absolute.

    ConfigError for a relative local path inside a submitted Ray job: it would resolve in the job's temporary
    working directory, which Ray removes when the job ends, so everything the run wrote would be lost."""
    path = str(path)
    if is_url(path):
        return path.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://"):]
    job = submitted_job()
    if job is not None and not os.path.isabs(path):
        raise ConfigError(f"{what} {path!r} is relative, and this runs inside Ray job {job}: it would resolve in "
                          "the job's temporary working directory and be lost when the job ends; give an absolute "
                          "path on shared storage or a bucket URL (s3://..., gs://...)")
    return os.path.abspath(path)


def exists(url: str) -> bool:
    if not is_url(url):
        return os.path.exists(url)
    fs, path = url_to_fs(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    """A local directory, or a prefix with at least one object under it (object stores have no empty dirs)."""
    if not is_url(url):
        return os.path.isdir(url)
    fs, path = url_to_fs(url)
    return fs.isdir(path)


def isfile(url: str) -> bool:
    if not is_url(url):
        return os.path.isfile(url)
    fs, path = url_to_fs(url)
    return fs.isfile(path)


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under `url`; [] when it does not exist."""
    if not is_url(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []
    fs, path = url_to_fs(url)
    if not fs.isdir(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def read_bytes(url: str) -> bytes:
    """The whole file; FileNotFoundError when it is missing."""
    if not is_url(url):
        with open(url, "rb") as f:
            return f.read()
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes) -> None:
    """Make `url` hold `data`, whole: local rename (`atomic.write_bytes_atomic`) or one object upload."""
    if not is_url(url):
        os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
        atomic.write_bytes_atomic(url, data)
        return
    fs, path = url_to_fs(url)
    fs.pipe_file(path, data)


def append_bytes(url: str, data: bytes) -> None:
    """Append to a local file; on an object store read the object and upload it again whole (no append there)."""
    if not is_url(url):
        with open(url, "ab") as f:
            f.write(data)
        return
    try:
        old = read_bytes(url)
    except FileNotFoundError:
        old = b""
    write_bytes(url, old + data)


def upload_file(local: str, url: str) -> None:
    """Publish a finished local file at `url` (the local file is consumed): a rename, or one whole upload."""
    if not is_url(url):
        atomic.replace_into_place(local, url)
        return
    fs, path = url_to_fs(url)
    fs.put_file(local, path)
    os.remove(local)


def remove_tree(url: str) -> None:
    """Remove `url` and everything under it; nothing there is not an error."""
    if not is_url(url):
        shutil.rmtree(url, ignore_errors=True)
        return
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def makedirs(url: str) -> None:
    """Local directories only: an object store has no directories, a key's prefix is made by writing the key."""
    if not is_url(url):
        os.makedirs(url, exist_ok=True)


@contextmanager
def staged_dir(url: str, last: tuple[str, ...] = ()) -> Iterator[str]:
    """A local directory to write a folder of outputs into; for a URL, each file is uploaded whole on success.

    Locally the folder itself is yielded (its writers publish atomically on their own); remotely a temporary
    folder, uploaded file by file when the block ends without error, the top-level files named in `last` after
    all others (a reader that takes one of them as "complete" never finds it before the rest), and removed
    either way."""
    if not is_url(url):
        os.makedirs(url, exist_ok=True)
        yield str(url)
        return
    tmp = tempfile.mkdtemp(prefix="gpfm-upload-")
    try:
        yield tmp
        files = [os.path.relpath(os.path.join(root, name), tmp) for root, _, names in os.walk(tmp) for name in names]
        for rel in sorted(files, key=lambda r: (r in last, r)):
            upload_file(os.path.join(tmp, rel), join(url, *rel.split(os.sep)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_mirror(url: str) -> str:
    """A local copy of a (small) remote folder, such as an exported teacher, for readers that need real files
    (timm, safetensors); local paths are returned unchanged. One copy per URL, file sizes and ETags per node (a
    rewritten export gets a new copy), made under a temporary name and renamed, so processes of one node that race
    share the first finished copy."""
    if not is_url(url):
        return str(url)
    import hashlib

    fs, path = url_to_fs(url)
    found = fs.find(path, detail=True)
    version = [(k, v.get("size"), str(v.get("ETag") or v.get("mtime") or v.get("LastModified")))
               for k, v in sorted(found.items())]
    key = hashlib.sha256(json.dumps([url, version]).encode()).hexdigest()[:16]
    dest = os.path.join(tempfile.gettempdir(), "gpfm-mirror", key)
    if os.path.isdir(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=".partial-")
    for remote in sorted(found):
        rel = posixpath.relpath(remote, path)
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        fs.get_file(remote, os.path.join(tmp, rel))
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextmanager
def open_h5(url: str) -> Iterator[Any]:
    """An HDF5 file for reading, local or remote (h5py reads a remote one through fsspec's file object)."""
    import h5py

    if not is_url(url):
        with h5py.File(url, "r") as f:
            yield f
        return
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as raw, h5py.File(raw, "r") as f:
        yield f


def ray_storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local path and None, or the URL's path and
    a pyarrow filesystem wrapping the same fsspec filesystem every other write uses (one set of credentials and
    endpoint settings for s3://, gs://, ...)."""
    if not is_url(url):
        return url, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = url_to_fs(url)
    return path, PyFileSystem(FSSpecHandler(fs))


def from_ray_path(url: str, path: str) -> str:
    """The URL of `path`, one Ray Train reports under `ray_storage(url)`'s storage_path (a checkpoint's): the
    scheme put back (s3://BUCKET/...), where Ray gives the bucket's path without it, which reads as a relative local
    path; local paths are returned unchanged."""
    if not is_url(url):
        return path
    fs, _ = url_to_fs(url)
    return fs.unstrip_protocol(path)
