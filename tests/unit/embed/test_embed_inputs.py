"""What --input is, and the labels of an image folder."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from gpfm_scale.embed.inputs import detect_kind, list_image_folder, load_tile_source
from gpfm_scale.errors import ConfigError


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def test_detect_kind(tmp_path):
    (tmp_path / "run" / "shards").mkdir(parents=True)
    assert detect_kind(str(tmp_path / "run"), "auto") == "tiles"
    assert detect_kind(str(tmp_path / "run" / "shards" / "*.tar"), "auto") == "tiles"
    pd.DataFrame({"slide_id": ["a"], "path": ["a.svs"]}).to_csv(tmp_path / "m.csv", index=False)
    assert detect_kind(str(tmp_path / "m.csv"), "auto") == "slides"
    pd.DataFrame({"slide_id": ["a"], "status": ["done"], "n_tiles": [1], "shards": [["x.tar"]]}).to_parquet(
        tmp_path / "run" / "manifest.parquet")
    assert detect_kind(str(tmp_path / "run" / "manifest.parquet"), "auto") == "tiles"
    _img(tmp_path / "folder" / "tumour" / "x.png")
    assert detect_kind(str(tmp_path / "folder"), "auto") == "images"
    (tmp_path / "wsi").mkdir()
    (tmp_path / "wsi" / "a.svs").write_bytes(b"")
    assert detect_kind(str(tmp_path / "wsi"), "auto") == "slides"
    _img(tmp_path / "tifs" / "a.tif")
    with pytest.raises(ConfigError, match="input_kind"):
        detect_kind(str(tmp_path / "tifs"), "auto")
    assert detect_kind(str(tmp_path / "tifs"), "images") == "images"


def test_tiler_manifest_gives_the_shards_of_done_slides_and_carried_columns(tmp_path):
    pd.DataFrame({"slide_id": ["a", "b"], "path": ["a.svs", "b.svs"], "status": ["done", "failed"],
                  "reason": ["", "corrupt"], "n_tiles": [3, 0], "shards": [["t-000001.tar"], []],
                  "label": ["x", "y"], "time": [1.0, 2.0]}).to_parquet(tmp_path / "manifest.parquet")
    source = load_tile_source(str(tmp_path))
    assert source.shards == [f"{tmp_path}/shards/t-000001.tar"] and source.extra_columns == ["label", "time"]


def test_image_folder_labels_from_folders_or_labels_csv(tmp_path, shared_data):
    table = list_image_folder(str(shared_data / "hgsc-nuclei"))
    assert len(table) == 1552
    assert table["label"].value_counts().to_dict() == {"connective": 657, "inflammatory": 602, "neoplastic": 293}
    assert (table["label"] == table["class"]).all() and "source_image" in table.columns  # labels.csv carried
    flat = list_image_folder(str(shared_data / "nct-crc-samples"))
    assert sorted(flat["label"]) == sorted(["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"])
    _img(tmp_path / "x.png")
    with pytest.raises(ConfigError, match="no class"):
        list_image_folder(str(tmp_path))
