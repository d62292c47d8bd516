"""The embedding stage end to end on a real local Ray Data pipeline: slides tiled then embedded, an exported teacher
on the tiler's shards (one tile corrupted), the hgsc-nuclei image folder, resume, and the refusals."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from gpfm_scale.config import apply_overrides, build_config, read_yaml
from gpfm_scale.embed_command import EmbedCommandConfig, run
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.models.experts import build_expert
from gpfm_scale.slides.synthetic import write_corrupt_slide
from tests.integration.tiling_helpers import decode, make_cohort, meta, read_samples

pytestmark = pytest.mark.usefixtures("ray_session")

TILE = 32  # px: tiny_a's and the tiny teacher's input size, so tiles reach the models unresized
FP16 = {"rtol": 2e-3, "atol": 2e-3}


def _cfg(**overrides) -> EmbedCommandConfig:
    base = {"batch_size": 16, "num_actors": 1, "read_tasks": 2, "decode_batch": 16, "images_per_task": 400,
            "tiling": {"grid": {"tile_px": TILE, "max_tiles_per_slide": 24, "min_tissue_fraction": 0.25},
                       "workers": 2, "encoding": "png", "thumbnails": False}}
    return build_config(EmbedCommandConfig, apply_overrides(base, overrides))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """3 synthetic slides + 1 corrupt file in a slide manifest, tiled on the fly and embedded with expert:tiny_a."""
    root = tmp_path_factory.mktemp("embed")
    manifest = make_cohort(root / "cohort", 3)
    write_corrupt_slide(root / "cohort" / "broken.svs")
    rows = pd.read_csv(manifest).to_dict("records") + [{"slide_id": "broken", "path": str(root / "cohort" /
                                                                                           "broken.svs"), "label": "a"}]
    pd.DataFrame(rows).to_csv(manifest, index=False)
    result = run(_cfg(), "expert:tiny_a", str(manifest), str(root / "out"))
    return root, result


def _tiles_by_slide(tiles_dir: Path) -> dict[str, dict[tuple[int, int], np.ndarray]]:
    """Every tile of the tiler's shards, decoded with PIL (independently of the stage's reader)."""
    out: dict[str, dict[tuple[int, int], np.ndarray]] = {}
    for s in read_samples(tiles_dir):
        m = meta(s)
        out.setdefault(m["slide_id"], {})[(m["x"], m["y"])] = decode(s["png"])
    return out


def _forward(model, tiles: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()).numpy()


def test_slide_manifest_is_tiled_embedded_and_the_corrupt_slide_reported(embedded):
    root, result = embedded
    out = root / "out"
    assert (result.n_done, result.n_failed, result.n_skipped) == (3, 1, 0)
    assert result.failed[0][0] == "broken" and result.failed[0][1].startswith("tiling: ")
    failed = pd.read_parquet(out / "failed.parquet")
    assert failed[["slide_id", "stage"]].values.tolist() == [["broken", "tiling"]] and failed["reason"][0]
    tiler = pd.read_parquet(out / "tiles" / "manifest.parquet").set_index("slide_id")
    index = pd.read_parquet(out / "index.parquet")
    assert index["slide_id"].tolist() == ["s00", "s01", "s02"] and index["label"].tolist() == ["a", "b", "a"]
    assert (index["kind"] == "slide").all() and (index["row"] == -1).all()
    tiles = _tiles_by_slide(out / "tiles")
    expert = build_expert(ExpertConfig(name="tiny_a", preprocessing="native"))  # embedding's contract
    for row in index.itertuples():
        with h5py.File(out / row.file) as f:
            features, coords = f["features"][:], f["coords"][:]
            assert f.attrs["model"] == "expert:tiny_a" and f["coords"].attrs["patch_size"] == TILE
        with h5py.File(out / "tiles" / "coords" / f"{row.slide_id}.h5") as f:
            np.testing.assert_array_equal(coords, f["coords"][:])  # same tiles, same order as the tiler's file
        n = int(tiler.loc[row.slide_id, "n_tiles"])
        assert features.shape == (n, 48) and features.dtype == np.float16 and row.n == n and n > 0
        expected = _forward(lambda x: expert(x)["cls"], [tiles[row.slide_id][tuple(c)] for c in coords])
        np.testing.assert_allclose(features.astype(np.float32), expected, **FP16)
    assert result.n_embedded == int(tiler["n_tiles"].sum())


def test_rerun_skips_finished_slides_and_redoes_a_lost_one(embedded):
    root, _ = embedded
    out = root / "out"
    files = sorted((out / "features").glob("*.h5"))
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    again = run(_cfg(), "expert:tiny_a", str(root / "cohort" / "manifest.csv"), str(out))
    assert (again.n_skipped, again.n_embedded, again.n_done) == (3, 0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in files} == stamps
    (out / "features" / "s01.h5").unlink()
    redo = run(_cfg(), "expert:tiny_a", str(root / "cohort" / "manifest.csv"), str(out))
    n01 = int(pd.read_parquet(out / "index.parquet").set_index("slide_id").loc["s01", "n"])
    assert (redo.n_skipped, redo.n_done, redo.n_embedded) == (2, 3, n01)
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in files if p.name != "s01.h5")
    with pytest.raises(ConfigError, match="use a new --out"):
        run(_cfg(), "expert:tiny_b", str(root / "cohort" / "manifest.csv"), str(out))


def test_workers_write_the_features_the_driver_gets_summaries_and_a_torn_file_is_redone(embedded):
    root, result = embedded
    out = root / "out"
    # per slide and batch a summary row, not 48 float16 values (96 bytes) per tile, reached the driver
    assert 0 < result.driver_bytes < 96 * result.n_embedded / 4, result.driver_bytes
    assert not (out / "parts").exists()  # scratch is gone once the slides are published
    before = {p.name: p.read_bytes() for p in (out / "features").glob("*.h5")}
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "features").glob("*.h5")}
    (out / "features" / "s02.h5").write_bytes(before["s02.h5"][: len(before["s02.h5"]) // 2])  # killed mid-write
    (out / "features" / "s01.h5.partial").write_bytes(b"torn")
    (out / "parts" / "s02").mkdir(parents=True)
    (out / "parts" / "s02" / "stale.npz").write_bytes(b"a killed run's part")
    again = run(_cfg(), "expert:tiny_a", str(root / "cohort" / "manifest.csv"), str(out))
    n02 = int(pd.read_parquet(out / "index.parquet").set_index("slide_id").loc["s02", "n"])
    assert (again.n_skipped, again.n_done, again.n_embedded, again.n_failed) == (2, 3, n02, 1)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "features").glob("*.h5")}.items() - stamps.items() == \
        {("s02.h5", (out / "features" / "s02.h5").stat().st_mtime_ns)}  # only the torn slide was redone
    with h5py.File(out / "features" / "s02.h5") as f, h5py.File(io.BytesIO(before["s02.h5"])) as old:
        np.testing.assert_array_equal(f["features"][:], old["features"][:])
        np.testing.assert_array_equal(f["coords"][:], old["coords"][:])
    assert not (out / "parts").exists() and not list((out / "features").glob("*.partial"))


def test_slides_embedded_in_float32_keep_full_precision(embedded, tmp_path):
    root, _ = embedded
    result = run(_cfg(feature_dtype="float32"), "expert:tiny_a", str(root / "out" / "tiles"), str(tmp_path))
    assert (result.n_done, result.n_failed) == (3, 1)
    for sid in ("s00", "s01", "s02"):
        with h5py.File(tmp_path / "features" / f"{sid}.h5") as f, \
                h5py.File(root / "out" / "features" / f"{sid}.h5") as half:
            full = f["features"][:]
            assert full.dtype == np.float32 and full.shape == half["features"].shape
            np.testing.assert_array_equal(f["coords"][:], half["coords"][:])
            np.testing.assert_allclose(full, half["features"][:].astype(np.float32), **FP16)
            assert (full != full.astype(np.float16).astype(np.float32)).any()  # not rounded to float16


def _corrupt_first_png(shard: Path) -> str:
    """Overwrite the PNG header of the shard's first tile in place (the tar stays valid); returns its key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data + 8)
        f.write(b"\xff" * 16)
    return member.name.rsplit(".", 1)[0]


def test_exported_teacher_on_tiler_shards_counts_a_corrupt_tile(embedded, tmp_path):
    from gpfm_scale.contracts.export import load_exported
    from gpfm_scale.data.config import CropConfig
    from gpfm_scale.models.meta_arch import SSLMetaArch
    from gpfm_scale.models.objective_config import ObjectiveConfig
    from gpfm_scale.train.checkpoint import export_teacher
    from tests.integration.pretrain_helpers import TINY_YAML

    root, _ = embedded
    tiles_dir = tmp_path / "tiles"
    shutil.copytree(root / "out" / "tiles", tiles_dir)
    key = _corrupt_first_png(min((tiles_dir / "shards").glob("*.tar")))
    bad_slide, bad_xy = key.split("/")[0], tuple(int(v) for v in key.split("/")[1].split("_"))
    objective = build_config(ObjectiveConfig, apply_overrides(read_yaml(TINY_YAML)["objective"],
                                                              {"model.experts": []}))
    export = tmp_path / "run7" / "export"  # as `gpfm-scale pretrain` writes it: the label is the run's folder
    export_teacher(SSLMetaArch(objective).eval(), objective.model.backbone, export, 5, True, crops=CropConfig())
    result = run(_cfg(), str(export), str(tiles_dir), str(tmp_path / "out"))
    assert (result.n_done, result.n_corrupt) == (3, 1) and result.n_failed == 1  # + the slide that failed tiling
    plain, config = load_exported(export)
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    tiles = _tiles_by_slide(root / "out" / "tiles")
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("slide_id")
    assert index.loc[bad_slide, "n_corrupt"] == 1 and index.loc[bad_slide, "n"] == len(tiles[bad_slide]) - 1
    for sid in index.index:
        with h5py.File(tmp_path / "out" / "features" / f"{sid}.h5") as f:
            features, coords = f["features"][:], [tuple(c) for c in f["coords"][:]]
            assert f.attrs["model"] == "teacher:run7@step5" and f.attrs["n_expected"] == len(tiles[sid])
        assert (sid != bad_slide or bad_xy not in coords) and len(coords) == index.loc[sid, "n"]
        expected = _forward(lambda x: plain.forward_features((x.float() / 255 - mean) / std)[:, 0],
                            [tiles[sid][c] for c in coords])
        np.testing.assert_allclose(features.astype(np.float32), expected, **FP16)


def test_hgsc_image_folder(shared_data, tmp_path):
    folder = shared_data / "hgsc-nuclei"
    result = run(_cfg(), "expert:tiny_a", str(folder), str(tmp_path))
    assert (result.kind, result.n_done, result.n_failed, result.n_embedded) == ("image", 1552, 0, 1552)
    index = pd.read_parquet(tmp_path / "index.parquet")
    labels = pd.read_csv(folder / "labels.csv").set_index("file")
    assert len(index) == 1552 and (index["kind"] == "image").all()
    assert index["label"].tolist() == [p.split("/")[0] for p in index["image"]]
    assert (index["label"] == labels.loc[index["image"], "class"].to_numpy()).all()
    with h5py.File(tmp_path / "features" / "images.h5") as f:
        features, paths = f["features"][:], [p.decode() for p in f["paths"][:]]
    assert features.shape == (1552, 48) and sorted(paths) == sorted(index["image"])
    assert [paths[r] for r in index["row"]] == index["image"].tolist()
    # embedding uses the expert's native contract: it resizes 64 -> 32 px itself, in float (ours rounds to uint8)
    expert = build_expert(ExpertConfig(name="tiny_a", preprocessing="native"))
    from PIL import Image

    picks = index.iloc[::300]
    direct = _forward(lambda x: expert(x)["cls"], [np.asarray(Image.open(folder / p).convert("RGB"))
                                                   for p in picks["image"]])
    got = features[picks["row"].to_numpy()].astype(np.float32)
    cosine = (got * direct).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(direct, axis=1)
    assert cosine.min() > 0.999
    assert run(_cfg(), "expert:tiny_a", str(folder), str(tmp_path)).n_embedded == 0  # complete: nothing redone
    with pytest.raises(ConfigError, match="float16 features"):
        run(_cfg(feature_dtype="float32"), "expert:tiny_a", str(folder), str(tmp_path))
    run(_cfg(feature_dtype="float32"), "expert:tiny_a", str(folder), str(tmp_path / "fp32"))
    with h5py.File(tmp_path / "fp32" / "features" / "images.h5") as f:
        full = f["features"][:]
    assert full.dtype == np.float32 and full.shape == features.shape
    rows32 = pd.read_parquet(tmp_path / "fp32" / "index.parquet").set_index("image").loc[index["image"], "row"]
    full = full[rows32.to_numpy()]  # rows are in arrival order, which differs between runs
    np.testing.assert_allclose(full, features[index["row"].to_numpy()].astype(np.float32), **FP16)  # the same...
    assert (full != full.astype(np.float16).astype(np.float32)).any()  # ...not rounded to float16


def test_timm_without_weights_refuses_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="allow_random_init"):
        run(_cfg(), "timm:vit_small_patch16_224", str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _tar(path: Path, samples: list[tuple[str, np.ndarray]]) -> Path:
    """A real WebDataset shard: one PNG + json per key, keys exactly as given (no normalisation)."""
    import io
    import json

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, rgb in samples:
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            x, y = (int(v) for v in key.rsplit("/", 1)[-1].split("_"))
            for ext, data in (("png", buf.getvalue()), ("json", json.dumps({"x": x, "y": y}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_keys_that_escape_out_fail_their_slide_and_write_nothing_outside(tmp_path):
    rng = np.random.default_rng(0)
    tile = lambda: rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)  # noqa: E731
    shard = _tar(tmp_path / "in" / "s.tar", [("../../x/0_0", tile()), ("../../x/32_0", tile()), ("./0_0", tile()),
                                             ("good/0_0", tile()), ("good/32_0", tile())])
    out = tmp_path / "a" / "b" / "out"
    old = os.umask(0o027)
    try:
        result = run(_cfg(), "expert:tiny_a", str(shard), str(out))
    finally:
        os.umask(old)
    everything = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert {p for p in everything if out not in p.parents} == {shard}  # nothing written outside --out
    failed = pd.read_parquet(out / "failed.parquet").set_index("slide_id")
    assert sorted(failed.index) == [".", "../../x"] and failed["reason"].str.contains("unsafe slide id").all()
    assert (result.n_done, result.n_failed) == (1, 2) and sorted(p.name for p in (out / "features").iterdir()) == \
        ["good.h5"]
    assert pd.read_parquet(out / "index.parquet")["slide_id"].tolist() == ["good"]
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o640)}, modes  # the umask's mode, not mkstemp's 0600


def test_16_bit_and_broken_images_are_converted_or_fail_alone(tmp_path):
    import cv2

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rgb16 = np.random.default_rng(1).integers(0, 65536, (TILE, TILE, 3), dtype=np.uint16)
    cv2.imwrite(str(folder / "deep.png"), rgb16[..., ::-1])  # a real 16-bit PNG (cv2 takes BGR)
    plain = np.random.default_rng(2).integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "plain.png"), plain[..., ::-1])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run(_cfg(), "expert:tiny_a", str(folder.parent), str(tmp_path / "out"))
    assert (result.n_done, result.n_failed) == (2, 1) and result.failed[0][0] == "a/broken"
    failed = pd.read_parquet(tmp_path / "out" / "failed.parquet")
    assert failed["slide_id"].tolist() == ["a/broken"] and "broken.png" in failed["reason"][0]
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("image")
    with h5py.File(tmp_path / "out" / "features" / "images.h5") as f:
        features = f["features"][:][index.loc[["a/deep.png", "a/plain.png"], "row"].to_numpy()]
    expert = build_expert(ExpertConfig(name="tiny_a"))
    expected = _forward(lambda x: expert(x)["cls"], [(rgb16 >> 8).astype(np.uint8), plain])
    np.testing.assert_allclose(features.astype(np.float32), expected, **FP16)


def test_a_model_giving_non_finite_features_fails_each_image_by_name(tmp_path):
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    tiny = {"img_size": TILE, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    weights = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **tiny).state_dict()
    weights["norm.weight"] = torch.full_like(weights["norm.weight"], float("nan"))  # a diverged model
    save_file(weights, str(tmp_path / "nan.safetensors"))
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((TILE, TILE, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    cfg = _cfg(weights=str(tmp_path / "nan.safetensors"), timm_kwargs=tiny)
    result = run(cfg, "timm:vit_small_patch16_224", str(folder.parent), str(tmp_path / "out"))
    assert (result.n_done, result.n_failed) == (0, 3)
    failed = pd.read_parquet(tmp_path / "out" / "failed.parquet").set_index("slide_id")
    assert sorted(failed.index) == ["a/0", "a/1", "a/2"] and failed["reason"].str.contains("non-finite").all()
    assert failed.loc["a/1", "reason"].startswith("a/1.png")
    assert pd.read_parquet(tmp_path / "out" / "index.parquet").empty
