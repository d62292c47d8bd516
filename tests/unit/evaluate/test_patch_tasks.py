"""Patch tasks: probe and kNN beat chance on hgsc-nuclei with a fixed hand-made feature model; kNN, retrieval,
few-shot and splits checked on hand-sized cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpfm_scale.contracts.features import load_image_features, write_image_features, write_index
from gpfm_scale.errors import ConfigError
from gpfm_scale.evaluate.config import EvaluateConfig, SplitConfig
from gpfm_scale.evaluate.patch_tasks import (euclidean_neighbours, few_shot, knn, knn_scores, linear_probe,
                                             majority_hits, retrieval, retrieval_hits, train_linear_probe)
from gpfm_scale.evaluate.splits import PatchData, apply_label_table, prepare_patch_data, read_label_table

CHANCE = 1 / 3


def colour_texture_features(path: Path) -> np.ndarray:
    """A fixed, training-free 'model': 8-bin RGB histograms, colour/texture statistics of the crop and its
    centre (the nucleus), gradient energy. 40 values."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    hist = [np.histogram(a[..., c], bins=8, range=(0, 1))[0] / a[..., c].size for c in range(3)]
    gray = a.mean(2)
    gy, gx = np.gradient(gray)
    mag = np.hypot(gx, gy)
    h, w = gray.shape
    centre = a[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    stats = [a.mean((0, 1)), a.std((0, 1)), centre.mean((0, 1)), centre.std((0, 1)),
             [mag.mean(), mag.std(), gray.std(), mag[h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean()]]
    return np.concatenate([*hist, *(np.ravel(s) for s in stats)])


def write_embedding(directory: Path, features: np.ndarray, paths: list[Path], labels: list[str], model: str) -> Path:
    write_image_features(directory, features, [str(p) for p in paths], model)
    write_index(directory, [{"slide_id": f"{p.parent.name}/{p.name}", "kind": "image", "file": "features/images.h5",
                             "row": i, "n": 1, "label": lab, "path": str(p)}
                            for i, (p, lab) in enumerate(zip(paths, labels, strict=True))])
    return directory


@pytest.fixture(scope="module")
def hgsc(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> PatchData:
    root = shared_data / "hgsc-nuclei"
    paths = sorted(root.glob("*/*.png"))
    if not paths:
        pytest.skip(f"{root} holds no class/image.png files")
    features = np.stack([colour_texture_features(p) for p in paths])
    directory = write_embedding(tmp_path_factory.mktemp("hgsc"), features, paths, [p.parent.name for p in paths],
                                "colour-texture")
    x, index = load_image_features(directory)
    return prepare_patch_data(x, index, SplitConfig(group_column=None), seed=0)


@pytest.fixture(scope="module")
def fast_cfg() -> EvaluateConfig:
    return EvaluateConfig(bootstrap=200)


def test_linear_probe_beats_chance_on_hgsc(hgsc: PatchData, fast_cfg: EvaluateConfig):
    assert hgsc.classes == ("connective", "inflammatory", "neoplastic")
    res = linear_probe(hgsc, fast_cfg)
    m = res.metrics
    assert m["balanced_accuracy"].value > 0.7 and m["balanced_accuracy"].ci_low > CHANCE + 0.2
    assert m["auc_macro"].value > 0.85
    assert res.scores.shape == (int((hgsc.split == "test").sum()), 3)


def test_knn_beats_chance_on_hgsc(hgsc: PatchData, fast_cfg: EvaluateConfig):
    m = knn(hgsc, fast_cfg).metrics
    assert m["balanced_accuracy"].value > 0.7 and m["balanced_accuracy"].ci_low > CHANCE + 0.2
    assert m["auc_macro"].value > 0.85


def test_random_features_stay_at_chance(hgsc: PatchData, fast_cfg: EvaluateConfig):
    noise = np.random.default_rng(0).normal(size=hgsc.features.shape).astype(np.float32)
    data = PatchData(noise, hgsc.labels, hgsc.classes, hgsc.split, hgsc.ids)
    assert knn(data, fast_cfg).metrics["balanced_accuracy"].value < CHANCE + 0.1


def test_retrieval_top_k_is_monotone_on_hgsc(hgsc: PatchData, fast_cfg: EvaluateConfig):
    m = retrieval(hgsc, fast_cfg).metrics
    assert m["acc_at_1"].value <= m["acc_at_3"].value <= m["acc_at_5"].value
    assert m["acc_at_1"].value > 0.7
    assert m["mvacc_at_5"].value <= m["acc_at_5"].value


def test_few_shot_reports_mean_and_spread(hgsc: PatchData):
    cfg = EvaluateConfig(few_shot={"shots": [1, 8, 10_000], "draws": 15})
    m = few_shot(hgsc, cfg).metrics
    assert "balanced_accuracy_10000shot" not in m  # more shots than a class holds: skipped
    for k in (1, 8):
        mean = m[f"balanced_accuracy_{k}shot"]
        assert mean.ci_low <= mean.value <= mean.ci_high
        assert m[f"balanced_accuracy_{k}shot_std"].value > 0
    assert m["balanced_accuracy_8shot"].value > CHANCE + 0.2


def test_probe_is_deterministic_with_its_seed():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    cfg = EvaluateConfig().probe.model_copy(update={"max_epochs": 8, "batch_size": 32})
    w1 = train_linear_probe((x[:90], y[:90]), (x[90:], y[90:]), 2, cfg, seed=3)[0].weight.detach().numpy()
    w2 = train_linear_probe((x[:90], y[:90]), (x[90:], y[90:]), 2, cfg, seed=3)[0].weight.detach().numpy()
    w3 = train_linear_probe((x[:90], y[:90]), (x[90:], y[90:]), 2, cfg, seed=4)[0].weight.detach().numpy()
    np.testing.assert_array_equal(w1, w2)
    assert not np.array_equal(w1, w3)  # the seed (batch order) matters, so equality above is not vacuous


def test_knn_scores_by_hand():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = np.array([0, 1, 1])
    query = np.array([[2.0, 0.2]])
    sims = np.array([2.0, 0.2, 2.2]) / (np.hypot(2.0, 0.2) * np.array([1.0, 1.0, np.sqrt(2)]))
    w = np.exp(sims / 0.5)
    # k = 2: the two nearest are bank rows 0 (class 0) and 2 (class 1)
    expected = np.array([w[0], w[2]]) / (w[0] + w[2])
    np.testing.assert_allclose(knn_scores(bank, labels, query, 2, k=2, temperature=0.5)[0], expected)


def test_euclidean_neighbours_match_a_full_sort():
    rng = np.random.default_rng(2)
    bank, query = rng.normal(size=(50, 4)), rng.normal(size=(7, 4))
    dist = ((query[:, None] - bank[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(euclidean_neighbours(bank, query, 5), np.argsort(dist, 1)[:, :5])


def test_retrieval_hit_definitions_by_hand():
    neighbours = np.array([[1, 0, 0, 2, 2],   # query class 0: miss @1, hit @3; vote 0 (2 of 5, tie with 2: 0 nearer)
                           [2, 2, 1, 1, 1]])  # query class 1: miss @1, hit @3; vote 1 (3 of 5)
    y = np.array([0, 1])
    np.testing.assert_array_equal(retrieval_hits(neighbours, y, 1), [False, False])
    np.testing.assert_array_equal(retrieval_hits(neighbours, y, 3), [True, True])
    np.testing.assert_array_equal(majority_hits(neighbours, y, 5, 3), [True, True])
    np.testing.assert_array_equal(majority_hits(neighbours, np.array([2, 2]), 5, 3), [False, False])


def _index(n: int, groups: int | None = None, split: list[str] | None = None) -> pd.DataFrame:
    rows = pd.DataFrame({"slide_id": [f"img{i:03d}" for i in range(n)], "label": ["a", "b"] * (n // 2)})
    if groups:
        rows["case_id"] = [f"case{i % groups}" for i in range(n)]
    if split:
        rows["split"] = split
    return rows


def test_grouped_split_keeps_groups_together_and_refuses_too_few_groups():
    x = np.zeros((200, 2), np.float32)
    data = prepare_patch_data(x, _index(200, groups=40), SplitConfig(), seed=0)
    cases = np.array([f"case{int(i[3:]) % 40}" for i in data.ids])
    for case in np.unique(cases):
        assert len(set(data.split[cases == case])) == 1
    assert 0.1 < np.mean(data.split == "test") < 0.3
    with pytest.raises(ConfigError, match="2 groups"):
        prepare_patch_data(x, _index(200, groups=2), SplitConfig(), seed=0)


def test_given_split_is_used_and_split_ignores_row_order():
    x = np.zeros((20, 2), np.float32)
    given = prepare_patch_data(x, _index(20, split=["train"] * 10 + ["test"] * 10), SplitConfig(), seed=0)
    assert (given.split[10:] == "test").all() and (given.split[:10] != "test").all()
    assert (given.split == "val").sum() == 2  # carved from train: ceil(10 * val / (train + val)) = ceil(1.25)
    index = _index(60)
    a = prepare_patch_data(np.arange(120, dtype=np.float32).reshape(60, 2), index, SplitConfig(), seed=5)
    perm = np.random.default_rng(0).permutation(60)
    b = prepare_patch_data(np.arange(120, dtype=np.float32).reshape(60, 2)[perm], index.iloc[perm], SplitConfig(),
                           seed=5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.split, b.split)
    np.testing.assert_array_equal(a.features, b.features)


def test_label_file_overrides_by_path_suffix(shared_data: Path):
    labels_csv = shared_data / "hgsc-nuclei" / "labels.csv"
    if not labels_csv.is_file():
        pytest.skip(f"{labels_csv} is missing")
    table = read_label_table(labels_csv)
    some = table.head(5)
    index = pd.DataFrame({"slide_id": [Path(f).stem for f in some["_key"]], "label": "wrong",
                          "path": [f"/mnt/data/hgsc-nuclei/{f}" for f in some["_key"]]})
    out = apply_label_table(index, table)
    assert list(out["label"]) == list(some["label"])
    assert list(out["source_image"]) == list(some["source_image"])
