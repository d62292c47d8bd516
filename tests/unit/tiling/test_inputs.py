"""Slide lists from manifests, folders and globs, local and through fsspec's memory filesystem."""

import fsspec
import pandas as pd
import pytest

from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling.inputs import load_slide_table


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_folder_and_glob(tmp_path):
    for name in ["b.svs", "a.tiff", "sub/c.ndpi", "notes.txt"]:
        _touch(tmp_path / name)
    df = load_slide_table(str(tmp_path))
    assert df["slide_id"].tolist() == ["a", "b", "c"]
    assert df["path"].tolist() == [str(tmp_path / "a.tiff"), str(tmp_path / "b.svs"), str(tmp_path / "sub/c.ndpi")]
    assert load_slide_table(str(tmp_path / "*.svs"))["slide_id"].tolist() == ["b"]


def test_a_folder_of_dcm_files_is_one_dicom_slide(tmp_path):
    """IDC downloads a DICOM WSI as one folder per series (a .dcm per level): the folder is the slide."""
    for name in ["TCGA-A1/level-0.dcm", "TCGA-A1/level-1.dcm", "TCGA-B2/x.DCM", "c.svs"]:
        _touch(tmp_path / name)
    df = load_slide_table(str(tmp_path))
    assert df["slide_id"].tolist() == ["TCGA-A1", "TCGA-B2", "c"]
    assert df["path"].tolist() == [str(tmp_path / "TCGA-A1"), str(tmp_path / "TCGA-B2"), str(tmp_path / "c.svs")]


def test_manifest_relative_paths_mpp_and_clinical_columns(tmp_path):
    pd.DataFrame({"slide_id": ["s 1", "s2"], "path": ["x/one.svs", "/abs/two.svs"], "mpp": [0.5, None],
                  "label": ["tumour", "normal"]}).to_csv(tmp_path / "m.csv", index=False)
    df = load_slide_table(str(tmp_path / "m.csv"))
    assert df["slide_id"].tolist() == ["s_1", "s2"]  # made file-safe
    assert df["path"].tolist() == [str(tmp_path / "x/one.svs"), "/abs/two.svs"]
    assert df["mpp"].iloc[0] == 0.5 and pd.isna(df["mpp"].iloc[1])
    assert df["label"].tolist() == ["tumour", "normal"]


def test_memory_filesystem_folder_and_parquet():
    fs = fsspec.filesystem("memory")
    for name in ["cohort/a.svs", "cohort/b.svs"]:
        with fs.open(name, "wb") as f:
            f.write(b"x")
    df = load_slide_table("memory://cohort")
    assert df["path"].tolist() == ["memory:///cohort/a.svs", "memory:///cohort/b.svs"]
    with fs.open("cohort/m.parquet", "wb") as f:
        pd.DataFrame({"path": ["a.svs"]}).to_parquet(f)
    df = load_slide_table("memory://cohort/m.parquet")
    assert df["slide_id"].tolist() == ["a"] and df["path"].tolist() == ["memory://cohort/a.svs"]


@pytest.mark.parametrize("rows,match", [
    ({"slide_id": ["a", "a"], "path": ["1.svs", "2.svs"]}, "not unique"),
    ({"slide_id": ["a"], "file": ["1.svs"]}, "'path' column"),
])
def test_bad_manifests_name_the_problem(tmp_path, rows, match):
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ConfigError, match=match):
        load_slide_table(str(tmp_path / "m.csv"))


def test_empty_folder_and_missing_manifest(tmp_path):
    with pytest.raises(ConfigError, match="no slides found"):
        load_slide_table(str(tmp_path))
    with pytest.raises(ConfigError, match="not found"):
        load_slide_table(str(tmp_path / "nope.csv"))


def test_mpp_cells_are_parsed_per_slide_not_coerced(tmp_path):
    """Issue 10.7: '0.25um' / '0,25' must not turn into NaN (which hands the slide to its own metadata)."""
    from gpfm_scale.slides.mpp import parse_manifest_mpp

    pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "path": ["a.svs", "b.svs", "c.svs", "d.svs"],
                  "mpp": ["0.25um", "0,25", "", "0.5"]}).to_csv(tmp_path / "m.csv", index=False)
    df = load_slide_table(str(tmp_path / "m.csv"))
    assert df["mpp"].iloc[0] == "0.25um" and df["mpp"].iloc[1] == "0,25"  # kept as written, judged per slide
    for bad in ["0.25um", "0,25", "-1", 0.0, "inf", True]:
        with pytest.raises(ValueError, match=f"invalid mpp {bad!r} in the manifest"):
            parse_manifest_mpp(bad)
    assert [parse_manifest_mpp(v) for v in [None, float("nan"), "", "  ", " 0.5 ", 0.25]] == [
        None, None, None, None, 0.5, 0.25]


@pytest.mark.parametrize("sid", ["..", ".", ".hidden"])
def test_ids_unsafe_after_mapping_are_refused_by_name(tmp_path, sid):
    pd.DataFrame({"slide_id": ["ok", sid], "path": ["a.svs", "b.svs"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ConfigError, match=f"slide id '{sid}'"):
        load_slide_table(str(tmp_path / "m.csv"))


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"\xff\xfe\x00garbage\x00", "not a readable CSV")])
def test_unreadable_manifest_is_a_config_error(tmp_path, content, match):
    (tmp_path / "m.csv").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_slide_table(str(tmp_path / "m.csv"))
