"""Worker-written parts + driver-side summaries: out-of-order rows become one file per slide in shard order, or a
failure with its reason."""

from __future__ import annotations

import h5py
import numpy as np

from gpfm_scale.embed.collect import ImageCollector, SlideCollector
from gpfm_scale.embed.sink import PartWriter, clear_scratch, publish_slide


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


class _Slides:
    """The real worker side (`sink.PartWriter`) under a temporary OUT, and the driver's collector after it."""

    def __init__(self, out, expected, max_corrupt_fraction=0.0) -> None:
        self.out = str(out)
        self.writer = PartWriter(self.out)
        self.col = SlideCollector(expected, max_corrupt_fraction)

    def feed(self, *batches: dict) -> list:
        return self.col.feed(self.writer.summarise(_merge(*batches)))

    def publish(self, v) -> tuple[str, str]:
        return publish_slide(self.out, v.slide_id, list(v.parts), v.n, "m", {"n_expected": v.n_expected}, {})


def test_out_of_order_rows_are_written_in_shard_order_once_the_marker_and_all_rows_arrived(tmp_path):
    slides = _Slides(tmp_path, {"a": 4, "b": 1})
    assert slides.feed(_rows("a", [2, 0]), _marker("a", 4)) == []  # marker first: 2 of 4 rows so far
    assert slides.feed(_rows("b", [0])) == []
    done = slides.feed(_rows("a", [3, 1]), _marker("b", 1))
    assert sorted((v.slide_id, v.ok, v.n, len(v.parts)) for v in done) == [("a", True, 4, 2), ("b", True, 1, 1)]
    a = next(v for v in done if v.slide_id == "a")
    assert slides.publish(a) == ("features/a.h5", "")
    with h5py.File(tmp_path / "features" / "a.h5") as f:
        np.testing.assert_array_equal(f["features"][:, 0], [0, 1, 2, 3])
        np.testing.assert_array_equal(f["coords"][:], [[0, 0], [10, 100], [20, 200], [30, 300]])
        assert f.attrs["n_expected"] == 4 and f["features"].dtype == np.float16
    assert not slides.col.open and not (tmp_path / "parts" / "a").exists()  # published parts are removed


def test_corrupt_tiles_are_counted_never_written_and_fail_the_slide_past_the_threshold(tmp_path):
    slides = _Slides(tmp_path, {"a": 4, "b": 2}, max_corrupt_fraction=0.25)
    (a,) = slides.feed(_rows("a", [0, 1, 2, 3], ok=[True, False, True, True], error="bad"), _marker("a", 4))
    assert a.ok and a.n == 3 and a.n_corrupt == 1
    slides.publish(a)
    with h5py.File(tmp_path / "features" / "a.h5") as f:
        np.testing.assert_array_equal(f["features"][:, 0], [0, 2, 3])  # no placeholder row
    (b,) = slides.feed(_rows("b", [0, 1], ok=[False, True], error="undecodable png"), _marker("b", 2))
    assert not b.ok and "1 of 2 tiles undecodable" in b.reason and "undecodable png" in b.reason
    assert not b.parts and not (tmp_path / "features" / "b.h5").exists()


def test_a_missing_or_short_part_fails_the_slide_and_publishes_nothing(tmp_path):
    slides = _Slides(tmp_path, {"a": 3})
    (a,) = slides.feed(_rows("a", [0, 1, 2]), _marker("a", 3))
    file, reason = publish_slide(str(tmp_path), "a", list(a.parts), a.n + 1, "m", {}, {})
    assert (file, reason) == ("", "its feature parts hold 3 rows, 4 expected")
    (tmp_path / "parts" / "a" / a.parts[0]).unlink()
    file, reason = slides.publish(a)
    assert file == "" and "FileNotFoundError" in reason
    assert not list(tmp_path.rglob("*.h5*"))  # neither a file nor a half-written one


def test_clear_scratch_drops_parts_and_half_written_files_but_keeps_published_ones(tmp_path):
    slides = _Slides(tmp_path, {"a": 1})
    (a,) = slides.feed(_rows("a", [0]), _marker("a", 1))
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "b.h5.partial").write_bytes(b"torn")
    (tmp_path / "features" / "c.h5").write_bytes(b"kept")
    clear_scratch(tmp_path)
    assert not (tmp_path / "parts").exists()
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["c.h5"]


def test_missing_tiles_fail_against_the_manifest_and_the_sweep_reports_unseen_slides(tmp_path):
    slides = _Slides(tmp_path, {"a": 3, "b": 2, "c": 5})
    (a,) = slides.feed(_rows("a", [0, 1]), _marker("a", 2, error="s.tar: truncated"))
    assert not a.ok and a.reason == "1 of 3 tiles missing from the shards: s.tar: truncated"
    (b,) = slides.feed(_rows("b", [0, 1]), _marker("b", 2, error="s.tar: truncated"))
    assert b.ok  # the manifest's count shows b whole, whatever the damage after it
    slides.feed(_rows("c", [0]))
    swept = slides.col.sweep(["a", "b", "c"])
    assert [(v.slide_id, v.ok) for v in swept] == [("c", False)] and "only 1 tile" in swept[0].reason


def test_without_a_manifest_a_slide_cut_by_damage_fails(tmp_path):
    slides = _Slides(tmp_path, None)
    (a,) = slides.feed(_rows("a", [0, 1]), _marker("a", 2, error="bad tar header"))
    assert not a.ok and "damaged shard" in a.reason
    (b,) = slides.feed(_rows("b", [0]), _marker("b", 1))
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


def test_slide_ids_that_are_not_one_safe_path_component_fail_alone_and_are_never_written(tmp_path):
    """Tar keys such as `../../x/0_0.jpg`, `./0_0.jpg` or `0_0.jpg` give slide ids '../../x', '.', ''."""
    out = tmp_path / "a" / "b" / "out"
    slides = _Slides(out, None)
    verdicts = []
    for sid in ("../../x", ".", "", ".hidden", "good"):
        verdicts += slides.feed(_rows(sid, [0, 1]), _marker(sid, 2))
    by_id = {v.slide_id: v for v in verdicts}
    assert by_id["good"].ok and [p.name for p in (out / "parts").iterdir()] == ["good"]  # no part for the others
    assert {p.parent for p in tmp_path.rglob("*.npz")} == {out / "parts" / "good"}
    for sid in ("../../x", ".", "", ".hidden"):
        assert not by_id[sid].ok and "slide id" in by_id[sid].reason, sid


def test_non_finite_features_fail_the_slide_naming_the_first_tile(tmp_path):
    slides = _Slides(tmp_path, {"a": 3, "b": 1}, max_corrupt_fraction=0.5)
    rows = _rows("a", [0, 1, 2])
    rows["features"][1] = [np.nan, 0]
    rows["features"][2] = [np.inf, 0]  # also what a float32 value past 65504 becomes when stored as float16
    verdicts = slides.feed(rows, _marker("a", 3), _rows("b", [0]), _marker("b", 1))
    by_id = {v.slide_id: v for v in verdicts}
    assert by_id["b"].ok and not by_id["a"].parts and [p.name for p in (tmp_path / "parts").iterdir()] == ["b"]
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
