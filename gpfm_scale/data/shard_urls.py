"""Shard URL expansion (`loader.shards`, `mix --shards`): globs, brace notation, lists, local paths or fsspec URLs.

Kept apart from the loaders so that both backends and the shard mixer use it without importing a loader.
"""

from __future__ import annotations

from braceexpand import braceexpand

from gpfm_scale.contracts.shards import list_shards
from gpfm_scale.errors import ConfigError


def expand_shard_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs from a glob, brace notation or a list of either; globs sorted, local paths kept plain."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for entry in entries:
        for pattern in braceexpand(entry):
            urls.extend(list_shards(pattern) if any(c in pattern for c in "*?[") else [pattern])
    if not urls:
        raise ConfigError(f"loader.shards: no shard found for {spec!r}")
    return urls
