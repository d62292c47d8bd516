"""Local copies of remote slides: every backend needs a real file path (cuCIM and OpenSlide cannot read streams).

`local_copy` passes local paths and file:// URLs through untouched, and copies any other fsspec URL (s3://, gs://,
memory://, ...) to a temporary file in `cache_dir`, removed when the block ends. The suffix is kept (.svs, .tiff)
because OpenSlide picks a format driver partly from it. Formats made of several files (MRXS) are not staged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

import fsspec

from gpfm_scale.errors import SlideReadError

logger = logging.getLogger(__name__)

_COPY_CHUNK = 8 * 2**20


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs (a Windows drive letter is not a scheme)."""
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1


def local_path(url: str) -> str:
    """The filesystem path of a local path or file:// URL."""
    parsed = urlparse(url)
    if parsed.scheme != "file":
        return url
    if parsed.netloc not in ("", "localhost"):
        raise SlideReadError(f"{url}: a file:// URL with a host ({parsed.netloc}) is not a local path")
    return unquote(parsed.path)


@contextlib.contextmanager
def local_copy(url: str, cache_dir: str | None = None) -> Iterator[str]:
    """Yield a local path holding the slide at `url`; a temporary copy for remote URLs, deleted afterwards.

    Raises SlideReadError (not found, no permission, unknown protocol) with the URL in the message.
    """
    if is_local(url):
        yield local_path(url)
        return
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    suffix = PurePosixPath(urlparse(url).path).suffix
    fd, tmp = tempfile.mkstemp(prefix="gpfm-slide-", suffix=suffix, dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            _copy(url, out)
        logger.debug("staged %s to %s (%d bytes)", url, tmp, os.path.getsize(tmp))
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _copy(url: str, out: object) -> None:
    try:
        with fsspec.open(url, "rb") as src:
            shutil.copyfileobj(src, out, _COPY_CHUNK)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        raise SlideReadError(f"{url}: no such remote file") from exc
    except (OSError, ValueError, ImportError) as exc:
        raise SlideReadError(f"{url}: cannot stage a local copy: {type(exc).__name__}: {exc}") from exc
