"""Driver-side grouping: out-of-order rows become one file per slide in shard order, or a failure with its reason."""

from __future__ import annotations

import numpy as np

from gpfm_scale.embed.collect import ImageCollector, SlideCollector


def _rows(slide: str, index: list[int], ok: list[bool] | None = None, total: int = -1,
          error: str = "") -> dict[str, np.ndarray]:
    n = len(index)
    ok = ok if ok is not None else [True] * n
    return {"slide_id": np.array([slide] * n), "index": np.array(index), "x": np.array(index) * 10,
            "y": np.array(index) * 100, "ok": np.array(ok), "error": np.array([error if not o else "" for o in ok]),
            "total": np.full(n, total), "features": np.array([[i, -i] for i in index], np.float16)}


def _marker(slide: str, total: int, error: str = "") -> dict[str, np.ndarray]:
    batch = _rows(slide, [-1], ok=[False], total=total)
    batch["error"] = np.array([error])
    return batch


def _merge(*batches: dict) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class _Sink:
    def __init__(self) -> None:
        self.files: dict[str, tuple] = {}

    def __call__(self, sid, features, coords, n_expected, n_corrupt) -> str:
        self.files[sid] = (features, coords, n_expected, n_corrupt)
        return f"features/{sid}.h5"


def test_out_of_order_rows_are_written_in_shard_order_once_the_marker_and_all_rows_arrived():
    sink = _Sink()
    col = SlideCollector(sink, {"a": 4, "b": 1}, max_corrupt_fraction=0.0)
    assert col.feed(_merge(_rows("a", [2, 0]), _marker("a", 4))) == []  # marker first: 2 of 4 rows so far
    assert col.feed(_rows("b", [0])) == []
    done = col.feed(_merge(_rows("a", [3, 1]), _marker("b", 1)))
    assert sorted((v.slide_id, v.ok, v.n) for v in done) == [("a", True, 4), ("b", True, 1)]
    features, coords, n_expected, n_corrupt = sink.files["a"]
    np.testing.assert_array_equal(features[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(coords, [[0, 0], [10, 100], [20, 200], [30, 300]])
    assert (n_expected, n_corrupt) == (4, 0) and not col.open


def test_corrupt_tiles_are_counted_never_written_and_fail_the_slide_past_the_threshold():
    sink = _Sink()
    col = SlideCollector(sink, {"a": 4, "b": 2}, max_corrupt_fraction=0.25)
    (a,) = col.feed(_merge(_rows("a", [0, 1, 2, 3], ok=[True, False, True, True], error="bad"), _marker("a", 4)))
    assert a.ok and a.n == 3 and a.n_corrupt == 1
    np.testing.assert_array_equal(sink.files["a"][0][:, 0], [0, 2, 3])  # no placeholder row
    (b,) = col.feed(_merge(_rows("b", [0, 1], ok=[False, True], error="undecodable png"), _marker("b", 2)))
    assert not b.ok and "1 of 2 tiles undecodable" in b.reason and "undecodable png" in b.reason
    assert "b" not in sink.files


def test_missing_tiles_fail_against_the_manifest_and_the_sweep_reports_unseen_slides():
    sink = _Sink()
    col = SlideCollector(sink, {"a": 3, "b": 2, "c": 5}, max_corrupt_fraction=0.0)
    (a,) = col.feed(_merge(_rows("a", [0, 1]), _marker("a", 2, error="s.tar: truncated")))
    assert not a.ok and a.reason == "1 of 3 tiles missing from the shards: s.tar: truncated"
    (b,) = col.feed(_merge(_rows("b", [0, 1]), _marker("b", 2, error="s.tar: truncated")))
    assert b.ok  # the manifest's count shows b whole, whatever the damage after it
    col.feed(_rows("c", [0]))
    swept = col.sweep(["a", "b", "c"])
    assert [(v.slide_id, v.ok) for v in swept] == [("c", False)] and "only 1 tile" in swept[0].reason


def test_without_a_manifest_a_slide_cut_by_damage_fails():
    col = SlideCollector(_Sink(), None, max_corrupt_fraction=0.0)
    (a,) = col.feed(_merge(_rows("a", [0, 1]), _marker("a", 2, error="bad tar header")))
    assert not a.ok and "damaged shard" in a.reason
    (b,) = col.feed(_merge(_rows("b", [0]), _marker("b", 1)))
    assert b.ok


class _ImageSink:
    def __init__(self) -> None:
        self.features, self.paths = [], []

    def append(self, features, paths) -> int:
        first = len(self.paths)
        self.features.extend(features.tolist())
        self.paths.extend(paths)
        return first


def test_image_collector_maps_each_good_image_to_its_row():
    sink = _ImageSink()
    col = ImageCollector(sink, ["x.png", "y.png", "z.png"])
    batch = {"row": np.array([2, 1]), "ok": np.array([True, False]), "error": np.array(["", "bad"]),
             "features": np.array([[2.0], [0.0]], np.float16)}
    assert col.feed(batch) == 1
    assert col.feed({"row": np.array([0]), "ok": np.array([True]), "error": np.array([""]),
                     "features": np.array([[0.5]], np.float16)}) == 1
    assert col.rows.tolist() == [1, -1, 0] and sink.paths == ["z.png", "x.png"] and col.errors == {1: "bad"}


def test_slide_ids_that_are_not_one_safe_path_component_fail_alone_and_are_never_written():
    """Tar keys such as `../../x/0_0.jpg`, `./0_0.jpg` or `0_0.jpg` give slide ids '../../x', '.', ''."""
    sink = _Sink()
    col = SlideCollector(sink, None, max_corrupt_fraction=0.0)
    verdicts = []
    for sid in ("../../x", ".", "", ".hidden", "good"):
        verdicts += col.feed(_merge(_rows(sid, [0, 1]), _marker(sid, 2)))
    by_id = {v.slide_id: v for v in verdicts}
    assert list(sink.files) == ["good"] and by_id["good"].ok
    for sid in ("../../x", ".", "", ".hidden"):
        assert not by_id[sid].ok and "slide id" in by_id[sid].reason, sid


def test_non_finite_features_fail_the_slide_naming_the_first_tile():
    sink = _Sink()
    col = SlideCollector(sink, {"a": 3, "b": 1}, max_corrupt_fraction=0.5)
    rows = _rows("a", [0, 1, 2])
    rows["features"][1] = [np.nan, 0]
    rows["features"][2] = [np.inf, 0]  # also what a float32 value past 65504 becomes when stored as float16
    verdicts = col.feed(_merge(rows, _marker("a", 3), _rows("b", [0]), _marker("b", 1)))
    by_id = {v.slide_id: v for v in verdicts}
    assert by_id["b"].ok and list(sink.files) == ["b"]
    assert not by_id["a"].ok and "non-finite" in by_id["a"].reason and "2 tile(s)" in by_id["a"].reason
    assert "(10, 100)" in by_id["a"].reason


def test_image_collector_fails_images_with_non_finite_features_by_name():
    sink = _ImageSink()
    col = ImageCollector(sink, ["x.png", "y.png", "z.png"])
    batch = {"row": np.array([0, 1, 2]), "ok": np.array([True, True, True]), "error": np.array(["", "", ""]),
             "features": np.array([[1.0], [np.inf], [np.nan]], np.float16)}
    assert col.feed(batch) == 1
    assert sink.paths == ["x.png"] and col.rows.tolist() == [0, -1, -1]
    assert set(col.errors) == {1, 2} and "y.png" in col.errors[1] and "non-finite" in col.errors[2]
