"""`run_demo` end to end in a reduced form (2 small synthetic slides, 4 pretraining steps, 20 patches per class) on
the session's Ray instance: the report compares the three models with the numbers of the evaluation stage, every
link in it resolves, the labelled patches are what the pixels say, and a rerun reuses every finished stage."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gpfm_scale.demo import DemoConfig, run_demo
from gpfm_scale.demo.config import TISSUE_CLASSES
from gpfm_scale.demo.data import write_hgsc_subset
from gpfm_scale.demo.diagnostics import weight_change
from gpfm_scale.demo.run import prepare_output
from gpfm_scale.errors import ConfigError
from gpfm_scale.evaluate.results import read_results_json

MODELS = ("teacher:pretrain@step4", "teacher:random-init@step0", "expert:tiny_a")
SMALL = DemoConfig(n_synthetic_slides=2, slide_width=2048, slide_height=1536, tissue_classes=list(TISSUE_CLASSES[:2]),
                   include_real_slide=False, use_hgsc=False, tiling={"grid": {"max_tiles_per_slide": 40}},
                   pretrain_steps=4, patches_per_class=20, bootstrap=20, batch_size=32)
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def demo(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert run_demo(str(out), SMALL) == 0
    return out


def _result_rows(report: str) -> dict[str, list[str]]:
    """'dataset / task' -> the three model cells of the report's Result table."""
    section = report.split("## Result", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| synthetic-tissue")]
    return {cells[0].strip(): [c.strip() for c in cells[2:]] for cells in rows}


def test_report_compares_the_three_models_with_the_evaluation_numbers(demo):
    report = (demo / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| dataset / task"))
    assert [m in header for m in MODELS] == [True, True, True]
    metrics, _ = read_results_json(demo / "evaluation" / "synthetic-tissue" / "results.json")
    rows = _result_rows(report)
    assert sorted(rows) == ["synthetic-tissue / knn", "synthetic-tissue / linear-probe"]
    for entry, cells in rows.items():
        task = entry.split(" / ")[1]
        for model, cell in zip(MODELS, cells, strict=True):
            value = metrics[model][task]["balanced_accuracy"].value
            assert cell.startswith(f"{value:.3f} ["), (entry, model, cell)
            assert re.search(r"\(([0-9.]+)\)$", cell), cell  # the rank
    assert "average rank" in report and "Scale: 4 CPU steps" in report


def test_every_link_in_the_report_exists(demo):
    report = (demo / "report.md").read_text()
    links = LINK.findall(report)
    assert len(links) > 20
    missing = [link for link in links if not (demo / link).exists()]
    assert not missing
    figures = [link for link in links if link.endswith(".png")]
    assert any("pca_" in f for f in figures) and any("thumbnails" in f for f in figures)


def test_random_init_is_the_trained_runs_own_initialisation(demo):
    """4 steps move the EMA teacher a little; two unrelated inits of this ViT are ~100% apart."""
    change = weight_change(demo / "pretrain" / "export", demo / "random-init" / "export")
    assert 0 < change < 0.05


def test_synthetic_patches_are_labelled_by_their_pixels_and_split_by_slide(demo):
    folder = demo / "patches" / "synthetic-tissue"
    labels = pd.read_csv(folder / "labels.csv")
    assert set(labels["label"]) == {"tumour_like", "stroma_like"}
    assert (labels.groupby("label").size() <= SMALL.patches_per_class).all()
    assert ((labels["split"] == "test") == (labels["case_id"] == "synthetic-1")).all()
    assert set(labels["split"]) == {"train", "test"}
    # the textures' colours (slides/_synthetic_content.py): tumour_like = 55% lilac (200, 150, 210) + 45% nuclei
    # (70, 30, 115) -> mean red ~141; stroma_like = pink (242, 190, 212) with darker stripes (214, 100, 158) -> red
    # 214..242. So the mean red of a patch's tissue pixels (not near-white) tells the classes apart at ~190.
    for name, label in zip(labels["file"], labels["label"], strict=True):
        rgb = np.asarray(Image.open(folder / name).convert("RGB")).reshape(-1, 3)
        tissue = rgb[rgb.min(axis=1) < 225]
        assert len(tissue) > 0.2 * len(rgb), name
        assert (tissue[:, 0].mean() < 190) == (label == "tumour_like"), (name, tissue.mean(axis=0))


def test_rerun_reuses_finished_stages_and_other_settings_start_clean(demo, ray_session):
    export = demo / "pretrain" / "export" / "model.safetensors"
    before = export.stat().st_mtime_ns, (demo / "report.md").read_text()
    assert run_demo(str(demo), SMALL) == 0
    assert export.stat().st_mtime_ns == before[0]
    after = (demo / "report.md").read_text()
    assert _result_rows(after) == _result_rows(before[1])
    assert "reused the finished stages" in after
    marker = demo / "features" / "stale.txt"
    marker.write_text("from other settings")
    changed = SMALL.model_copy(update={"bootstrap": 0, "pretrain_steps": 1})
    assert prepare_output(demo, changed) is False
    assert not marker.exists() and not (demo / "pretrain").exists() and not (demo / "report.md").exists()


def test_a_folder_that_is_not_a_demo_is_refused_not_cleaned(tmp_path):
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "mine.h5").write_text("someone else's")
    with pytest.raises(ConfigError, match="not a demo folder"):
        prepare_output(tmp_path, SMALL)
    assert (tmp_path / "features" / "mine.h5").is_file() and not (tmp_path / "demo.json").exists()


def test_hgsc_subset_is_class_balanced_and_copied(shared_data, tmp_path):
    cfg = DemoConfig(patches_per_class=7, seed=3)
    folder = write_hgsc_subset(shared_data / "hgsc-nuclei", tmp_path / "hgsc", cfg)
    table = pd.read_csv(folder / "labels.csv")
    assert table.groupby("label").size().to_dict() == {"connective": 7, "inflammatory": 7, "neoplastic": 7}
    assert all(f.startswith(f"{label}/") for f, label in zip(table["file"], table["label"], strict=True))
    for f in table["file"]:
        assert (folder / f).read_bytes() == (shared_data / "hgsc-nuclei" / f).read_bytes()
    assert write_hgsc_subset(shared_data / "hgsc-nuclei", tmp_path / "hgsc", cfg) == folder
    assert pd.read_csv(folder / "labels.csv").equals(table)
