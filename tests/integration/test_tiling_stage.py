"""The tiling stage end to end on a real local Ray instance: pixels, metadata, failures, resume, zero-decode."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from gpfm_scale.config import build_config
from gpfm_scale.contracts.shards import SAMPLE_FIELDS, sample_key
from gpfm_scale.slides.open import open_slide
from gpfm_scale.slides.synthetic import truncate_file, write_corrupt_slide, write_synthetic_slide
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import run
from tests.integration.tiling_helpers import decode, make_cohort, meta, read_samples, tile_set

pytestmark = pytest.mark.usefixtures("ray_session")


def _cfg(**grid) -> TilingConfig:
    g = {"tile_px": 128, "max_tiles_per_slide": 40, "min_tissue_fraction": 0.25} | grid
    return build_config(TilingConfig, {"grid": g, "workers": 2, "encoding": "png", "shard_max_bytes": 200_000})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), 3)


def test_tiles_equal_reader_pixels_at_recorded_coords(cohort, tmp_path):
    cfg = _cfg(target_mpp=0.5)  # resampled from level 0 (0.25 µm/px): a 256-px read per 128-px tile
    result = run(cfg, str(cohort), str(tmp_path))
    assert result.ok and result.n_done == 3 and result.n_tiles > 0
    samples = read_samples(tmp_path)
    assert len(samples) == result.n_tiles
    table = pd.read_csv(cohort).set_index("slide_id")
    for s in samples[::7]:
        m = meta(s)
        assert s["__key__"] == f"{m['slide_id']}/{m['x']}_{m['y']}" == sample_key(m["slide_id"], m["x"], m["y"])
        assert set(m) == set(SAMPLE_FIELDS)
        assert (m["tile_px"], m["level"], m["mpp"], m["magnification"]) == (128, 0, 0.5, 20.0)
        assert 0.25 <= m["tissue_fraction"] <= 1 and m["reader"] == "cucim"
        with open_slide(table.loc[m["slide_id"], "path"]) as reader:
            region = reader.read_region((m["x"], m["y"]), 0, (256, 256))
        expected = cv2.resize(region, (128, 128), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(decode(s["png"]), expected)
    # coordinates files agree with the shards
    for sid in table.index:
        with h5py.File(tmp_path / "coords" / f"{sid}.h5") as f:
            coords = {tuple(c) for c in f["coords"][:]}
            assert f["coords"].attrs["patch_size"] == 128 and f["coords"].attrs["patch_size_level0"] == 256
            assert f["coords"].attrs["target_magnification"] == 20.0
        keys = {(meta(s)["x"], meta(s)["y"]) for s in samples if meta(s)["slide_id"] == sid}
        assert coords == keys
        assert (tmp_path / "thumbnails" / f"{sid}.png").stat().st_size > 0
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert set(manifest["status"]) == {"done"} and manifest["label"].tolist() == ["a", "b", "a"]
    assert manifest["n_tiles"].sum() == result.n_tiles


def test_bad_slides_fail_with_reasons_and_the_rest_finish(cohort, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    write_corrupt_slide(bad / "corrupt.svs")
    write_synthetic_slide(bad / "truncated.svs", 2048, 1536, seed=5, levels=2)
    truncate_file(bad / "truncated.svs", 0.5)
    write_synthetic_slide(bad / "no-mpp.svs", 1024, 1024, seed=6, levels=2, mpp_in_metadata=False)
    (bad / "notes.svs").write_text("not an image")
    rows = pd.read_csv(cohort).to_dict("records")
    rows += [{"slide_id": p.stem, "path": str(p), "label": "x"} for p in sorted(bad.iterdir())]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    result = run(_cfg(), str(tmp_path / "m.csv"), str(tmp_path / "out"))
    reasons = dict(result.failed)
    assert result.n_done == 3 and set(reasons) == {"corrupt", "truncated", "no-mpp", "notes"}
    assert "MissingMppError" in reasons["no-mpp"]
    assert all(reasons.values())
    keys = tile_set(tmp_path / "out")
    assert not any(k.split("/")[0] in reasons for k in keys)
    # the manifest's mpp column (or a config fallback) repairs the slide without MPP; failures are retried on request
    next(r for r in rows if r["slide_id"] == "no-mpp")["mpp"] = 0.25
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    again = run(_cfg().model_copy(update={"retry_failed": True}), str(tmp_path / "m.csv"), str(tmp_path / "out"))
    assert set(dict(again.failed)) == {"corrupt", "truncated", "notes"}
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("slide_id")
    assert manifest.loc["no-mpp", "status"] == "done" and manifest.loc["no-mpp", "mpp_source"] == "manifest"


def test_rerun_skips_done_slides_and_refuses_other_settings(cohort, tmp_path):
    first = run(_cfg(), str(cohort), str(tmp_path))
    before = tile_set(tmp_path)
    second = run(_cfg(), str(cohort), str(tmp_path))
    assert second.n_tiles == 0 and second.n_done == first.n_done
    assert tile_set(tmp_path) == before
    from gpfm_scale.errors import ConfigError
    with pytest.raises(ConfigError, match="grid"):
        run(_cfg(tile_px=64), str(cohort), str(tmp_path))


def test_zero_decode_copies_the_slides_own_tiles(cohort, tmp_path):
    cfg = build_config(TilingConfig, {"grid": {"tile_px": 256, "max_tiles_per_slide": 10}, "workers": 1})
    result = run(cfg, str(cohort), str(tmp_path))
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert result.ok and manifest["zero_decode"].all()
    table = pd.read_csv(cohort).set_index("slide_id")
    for s in read_samples(tmp_path)[::5]:
        m = meta(s)
        with open_slide(table.loc[m["slide_id"], "path"]) as reader:
            raw = reader.read_raw_tile(0, m["x"] // 256, m["y"] // 256)
            pixels = reader.read_region((m["x"], m["y"]), 0, (256, 256))
        assert s["jpg"] == raw  # the stored bytes, not a re-encode
        assert np.abs(decode(s["jpg"]).astype(int) - pixels).max() <= 2  # tolerance: see the slides tests


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_real_svs_at_half_and_one_micron(real_svs, tmp_path, mpp):
    cfg = build_config(TilingConfig, {"grid": {"tile_px": 224, "target_mpp": mpp, "max_tiles_per_slide": None},
                                      "workers": 1})
    result = run(cfg, str(real_svs), str(tmp_path))
    assert result.ok
    samples = read_samples(tmp_path)
    footprint = 224 * mpp / 0.499
    full_grid = np.ceil(2220 / footprint) * np.ceil(2967 / footprint)  # edge 'pad': partial tiles at the edges
    assert 0.3 * full_grid <= len(samples) <= full_grid  # H&E skin covers part of the region
    fractions = [meta(s)["tissue_fraction"] for s in samples]
    assert min(fractions) >= 0.25 and np.mean(fractions) > 0.5
    assert all(meta(s)["magnification"] == pytest.approx(10 / mpp, rel=0.01) for s in samples)  # 0.499 is read as is
    tile = decode(samples[len(samples) // 2]["jpg"])
    assert tile.shape == (224, 224, 3) and tile.std() > 10  # tissue, not blank glass


@pytest.fixture(scope="module")
def ragged_slide(tmp_path_factory):
    """A slide whose size is not a multiple of the 256-px stride: a partial last column (232 px) and row (188 px)."""
    folder = tmp_path_factory.mktemp("ragged")
    write_synthetic_slide(folder / "r.svs", 1000, 700, mpp=0.25, tile=256, levels=2, seed=4)
    pd.DataFrame([{"slide_id": "r", "path": str(folder / "r.svs")}]).to_csv(folder / "m.csv", index=False)
    return folder / "m.csv", folder / "r.svs"


def _edge_cfg(**settings) -> TilingConfig:
    grid = {"tile_px": 256, "max_tiles_per_slide": None, "min_tissue_fraction": 0.0} | settings.pop("grid", {})
    tissue = {"mask_mpp": 1.0, "min_tissue_area_um2": 100.0}  # the slide is 250 x 175 µm: keep its small blobs
    return build_config(TilingConfig, {"grid": grid, "tissue": tissue, "workers": 1} | settings)


def test_edge_tiles_are_padded_white_by_default(ragged_slide, tmp_path):
    manifest_csv, slide = ragged_slide
    result = run(_edge_cfg(encoding="png", zero_decode=False), str(manifest_csv), str(tmp_path))
    assert result.ok and result.n_tiles == 4 * 3  # the partial column and row are tiled, as CLAM does
    samples = {(meta(s)["x"], meta(s)["y"]): decode(s["png"]) for s in read_samples(tmp_path)}
    assert set(samples) == {(x, y) for x in (0, 256, 512, 768) for y in (0, 256, 512)}  # all start inside
    with open_slide(str(slide)) as reader:
        for (x, y), tile in samples.items():
            w, h = min(256, 1000 - x), min(256, 700 - y)  # the part of the tile inside the slide
            np.testing.assert_array_equal(tile[:h, :w], reader.read_region((x, y), 0, (w, h)))
            assert (tile[h:] == 255).all() and (tile[:, w:] == 255).all()
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert manifest["untiled_tissue_fraction"].tolist() == [0.0]
    with h5py.File(tmp_path / "coords" / "r.h5") as f:
        coords = f["coords"][:]
    assert (coords[:, 0] < 1000).all() and (coords[:, 1] < 700).all()


def test_zero_decode_copies_inner_tiles_and_pads_edge_tiles(ragged_slide, tmp_path):
    manifest_csv, slide = ragged_slide
    result = run(_edge_cfg(), str(manifest_csv), str(tmp_path))
    assert result.ok and result.n_tiles == 4 * 3
    assert pd.read_parquet(tmp_path / "manifest.parquet")["zero_decode"].tolist() == [True]
    with open_slide(str(slide)) as reader:
        for s in read_samples(tmp_path):
            x, y = meta(s)["x"], meta(s)["y"]
            w, h = min(256, 1000 - x), min(256, 700 - y)
            tile = decode(s["jpg"]).astype(int)
            if (w, h) == (256, 256):
                assert s["jpg"] == reader.read_raw_tile(0, x // 256, y // 256)  # copied, not re-encoded
            else:  # a stored edge tile holds undefined pixels past the edge: read, padded white, encoded
                assert np.abs(tile[:h, :w] - reader.read_region((x, y), 0, (w, h))).mean() < 3
                outside = np.concatenate([tile[h:].reshape(-1), tile[:h, w:].reshape(-1)])
                assert outside.mean() > 250  # white (JPEG rings a little at the slide's edge)


def test_edge_drop_keeps_whole_tiles_and_records_the_untiled_tissue(ragged_slide, tmp_path):
    manifest_csv, _ = ragged_slide
    result = run(_edge_cfg(grid={"edge": "drop"}), str(manifest_csv), str(tmp_path))
    assert result.ok and result.n_tiles == 3 * 2  # the old behaviour: only tiles that fit
    keys = {(meta(s)["x"], meta(s)["y"]) for s in read_samples(tmp_path)}
    assert keys == {(x, y) for x in (0, 256, 512) for y in (0, 256)}
    untiled = pd.read_parquet(tmp_path / "manifest.parquet")["untiled_tissue_fraction"].iloc[0]
    assert 0 < untiled < 1  # the synthetic tissue reaches into the 232-px and 188-px strips


def test_dicom_slides_tile_like_tiff_slides(tmp_path):
    """A --slides folder holding one folder of .dcm files per slide (as IDC serves TCGA): tiles are its pixels."""
    pytest.importorskip("wsidicom")
    from gpfm_scale.slides.synthetic_dicom import write_dicom_wsi

    with open_slide(str(write_synthetic_slide(tmp_path / "src.svs", 1000, 700, seed=4, levels=1).path)) as src:
        pixels = src.read_region((0, 0), 0, (1000, 700))
    info = write_dicom_wsi(tmp_path / "cohort" / "TCGA-XX", pixels, mpp=0.25, tile=256, levels=3)
    result = run(_edge_cfg(encoding="png"), str(tmp_path / "cohort"), str(tmp_path / "out"))
    assert result.ok and result.n_tiles == 4 * 3
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest[["slide_id", "reader", "mpp_source"]].values.tolist() == [["TCGA-XX", "dicom", "slide"]]
    assert manifest["path"].tolist() == [info.folder]
    for s in read_samples(tmp_path / "out"):
        m = meta(s)
        x, y = m["x"], m["y"]
        expected = np.full((256, 256, 3), 255, np.uint8)
        part = pixels[y:y + 256, x:x + 256]
        expected[: part.shape[0], : part.shape[1]] = part
        assert m["reader"] == "dicom" and m["mpp"] == 0.25
        np.testing.assert_array_equal(decode(s["png"]), expected)
