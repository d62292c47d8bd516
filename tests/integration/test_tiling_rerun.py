"""Issue 10 for the tiling stage on a real local Ray: a rerun keeps what its input leaves out, bad manifest mpp
fails only its slide, attempts are counted, 0-tile slides say why, and files get the user's umask."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from gpfm_scale.cli import main
from gpfm_scale.config import build_config
from gpfm_scale.slides.synthetic import write_corrupt_slide
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import run
from tests.integration.tiling_helpers import make_cohort, tile_set

pytestmark = pytest.mark.usefixtures("ray_session")

SETTINGS = {"grid": {"tile_px": 128, "max_tiles_per_slide": 20, "min_tissue_fraction": 0.25}, "workers": 1,
            "shard_max_bytes": 1}


def _cfg(**over) -> TilingConfig:
    return build_config(TilingConfig, SETTINGS | over)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), 3)


def _manifest(out) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet").set_index("slide_id")


def _subset(cohort, tmp_path, ids, **columns) -> str:
    table = pd.read_csv(cohort).set_index("slide_id").loc[list(ids)].reset_index()
    for name, values in columns.items():
        table[name] = values
    table.to_csv(tmp_path / "subset.csv", index=False)
    return str(tmp_path / "subset.csv")


def test_rerun_with_fewer_slides_keeps_the_others(cohort, tmp_path):
    """10.1: a subset manifest, or a slide gone from the folder, must not delete the other slides' shards."""
    out = tmp_path / "out"
    assert run(_cfg(), str(cohort), str(out)).n_done == 3
    before = tile_set(out)
    subset = run(_cfg(), _subset(cohort, tmp_path, ["s00"]), str(out))
    assert tile_set(out) == before
    assert subset.ok and subset.n_slides == 1 and subset.absent == ["s01", "s02"]
    manifest = _manifest(out)
    assert manifest["status"].tolist() == ["done"] * 3
    assert manifest["in_input"].tolist() == [True, False, False] and manifest.loc["s02", "label"] == "a"
    moved = run(_cfg(), str(cohort.parent / "s0[01].svs"), str(out))  # s02 moved out of the folder
    assert moved.absent == ["s02"] and tile_set(out) == before
    assert run(_cfg(), str(cohort), str(out)).absent == [] and tile_set(out) == before


def test_bad_manifest_mpp_fails_that_slide_and_attempts_are_counted(cohort, tmp_path):
    """10.7 and 10.12: attempts = times a slide was handed to a tiling actor, over all runs into --out."""
    write_corrupt_slide(tmp_path / "bad.svs")
    table = pd.read_csv(_subset(cohort, tmp_path, ["s00", "s01", "s02"], mpp=["0.25um", "0,25", None]))
    table.loc[len(table)] = {"slide_id": "bad", "path": str(tmp_path / "bad.svs"), "label": "x", "mpp": None}
    table.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out"
    first = run(_cfg(), str(tmp_path / "m.csv"), str(out))
    reasons = dict(first.failed)
    assert set(reasons) == {"s00", "s01", "bad"}
    assert "invalid mpp '0.25um' in the manifest" in reasons["s00"]
    assert "invalid mpp '0,25' in the manifest" in reasons["s01"]
    manifest = _manifest(out)
    assert manifest.loc["s02", "status"] == "done" and manifest.loc["s02", "mpp_source"] == "slide"
    assert manifest["attempts"].to_dict() == {"s00": 0, "s01": 0, "s02": 1, "bad": 1}
    table.loc[table["slide_id"] == "s00", "mpp"] = "0.25"
    table.to_csv(tmp_path / "m.csv", index=False)
    second = run(_cfg(retry_failed=True), str(tmp_path / "m.csv"), str(out))
    assert set(dict(second.failed)) == {"s01", "bad"}
    manifest = _manifest(out)
    assert manifest.loc["s00", "mpp_source"] == "manifest"
    assert manifest["attempts"].to_dict() == {"s00": 1, "s01": 0, "s02": 1, "bad": 2}


def test_slide_without_tissue_is_done_with_a_reason_and_listed(cohort, tmp_path, capsys):
    """10.8: 0 tiles is recorded and said, not a silent 'done'."""
    argv = ["tile", "--slides", _subset(cohort, tmp_path, ["s00"]), "--out", str(tmp_path / "out"), "--workers",
            "1", "--tile-px", "128", "--set", "tissue.min_saturation=255", "--log-level", "ERROR"]
    assert main(argv) == 0
    assert "NO TILES s00: no tiles: no tissue found" in capsys.readouterr().err
    row = _manifest(tmp_path / "out").loc["s00"]
    assert (row["status"], row["n_tiles"], row["reason"]) == ("done", 0, "no tiles: no tissue found")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_users_umask(cohort, tmp_path, umask):
    """10.11: shards, coords, thumbnails, manifest and config, written by the driver and by the actors."""
    old = os.umask(umask)
    try:
        assert run(_cfg(), _subset(cohort, tmp_path, ["s00"]), str(tmp_path / "out")).ok
    finally:
        os.umask(old)
    files = [p for pattern in ("shards/*.tar", "coords/*.h5", "thumbnails/*.png", "manifest.parquet", "config.yaml")
             for p in (tmp_path / "out").glob(pattern)]
    assert len(files) == 5
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o666 & ~umask)
                                                                             for p in files}
