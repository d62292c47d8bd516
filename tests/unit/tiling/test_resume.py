"""What a rerun keeps and what it may clear in an existing --out (issue 10.1 and 10.10), without Ray."""

from __future__ import annotations

import pandas as pd
import pytest

from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.manifest import RunManifest, SlideOutcome
from gpfm_scale.tiling.resume import check_layout, reconcile


def _table(*ids: str) -> pd.DataFrame:
    return pd.DataFrame({"slide_id": list(ids), "path": [f"/x/{s}.svs" for s in ids], "label": ["l"] * len(ids)})


def _out_with(tmp_path, shards: dict[str, list[str]]) -> tuple[OutputDir, RunManifest]:
    """An output where each shard holds the given slides, all marked done, as a finished run leaves it."""
    out = OutputDir(str(tmp_path))
    out.makedirs()
    ids = [s for slides in shards.values() for s in slides]
    manifest = RunManifest.from_inputs(_table(*ids), None)
    for name, slides in shards.items():
        (tmp_path / "shards" / name).write_bytes(b"tar")
        for sid in slides:
            manifest.mark_done(SlideOutcome(sid, ok=True, n_tiles=3), name, "sha")
    manifest.save(out)
    return out, manifest


def test_slides_absent_from_the_input_keep_their_rows_and_shards(tmp_path):
    out, _ = _out_with(tmp_path, {"tiles-000000.tar": ["a", "b"], "tiles-000001.tar": ["c"]})
    manifest = RunManifest.from_inputs(_table("a"), RunManifest.load(out))
    assert reconcile(out, manifest, True, "tiles") == 2
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["tiles-000000.tar", "tiles-000001.tar"]
    assert manifest.absent() == ["b", "c"] and manifest.in_input() == ["a"]
    assert [manifest.rows[s]["status"] for s in "abc"] == ["done"] * 3
    assert manifest.rows["c"]["shards"] == ["tiles-000001.tar"] and manifest.rows["c"]["label"] == "l"
    manifest.save(out)
    again = RunManifest.from_inputs(_table("a", "b", "c"), RunManifest.load(out))  # back in the input
    assert again.absent() == [] and again.rows["b"]["status"] == "done"


def test_only_the_newest_unlisted_shard_is_a_crash_leftover(tmp_path):
    out, manifest = _out_with(tmp_path, {"tiles-000000.tar": ["a"]})
    (tmp_path / "shards" / "tiles-000001.tar").write_bytes(b"renamed, manifest not yet saved")
    assert reconcile(out, manifest, True, "tiles") == 1
    assert not (tmp_path / "shards" / "tiles-000001.tar").exists()


@pytest.mark.parametrize("stray,had_manifest", [
    ("tiles-000000.tar", True),   # older than a listed shard: no crash leaves that
    ("other-000005.tar", True),   # another run name
    ("tiles-000005.tar", False),  # no manifest at all: nothing says these are ours to delete
])
def test_unlisted_shards_that_no_crash_leaves_are_refused_not_deleted(tmp_path, stray, had_manifest):
    out, manifest = _out_with(tmp_path, {"tiles-000001.tar": ["a"]})
    (tmp_path / "shards" / stray).write_bytes(b"someone's data")
    with pytest.raises(ConfigError, match="move them away"):
        reconcile(out, manifest, had_manifest, "tiles")
    assert (tmp_path / "shards" / stray).exists() and (tmp_path / "shards" / "tiles-000001.tar").exists()


@pytest.mark.parametrize("text,match", [
    (b"lr: 0.1\n", "not the config of a tiling run"),
    (b"{ unclosed: [\n", "not YAML"),
    (b"- a list\n", "not a mapping"),
])
def test_foreign_or_broken_config_yaml_is_refused(tmp_path, text, match):
    out = OutputDir(str(tmp_path))
    (tmp_path / "config.yaml").write_bytes(text)
    with pytest.raises(ConfigError, match=match):
        check_layout(out, TilingConfig())
