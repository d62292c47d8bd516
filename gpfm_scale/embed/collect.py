"""Driver side of the embedding pipeline: per-slide summaries arrive out of order and become verdicts.

For slides the inference actors write the features themselves (`sink.py`); the driver receives one small summary
row per slide per batch (`sink.SUMMARY_COLUMNS`). `SlideCollector` adds them up for the slides still open, so
memory follows the pipeline's in-flight window, not the cohort, and holds no feature. A slide closes when its marker
row (see `decode.py`) and all the rows it announces have been summarised; it is then judged against the tiler
manifest's tile count and either handed on to be published (its parts, `sink.Publisher`) or failed with a one-line
reason. `ImageCollector` appends image features to one incrementally written `images.h5` (driver-side: small).

Two checks happen here, before anything is published, because only here a bad item can fail alone: a slide id that
is not one safe path component (from a tar key such as `../../x/0_0.jpg` or `./0_0.jpg`) fails its slide, and
non-finite features (NaN/inf in the stored dtype: a diverged model, or float16 overflowing past 65504), counted by
the actors, fail their slide, or their image, by name. Writing them would hand the evaluation NaN metrics or a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpfm_scale.contracts.features import ImageFeatureWriter
from gpfm_scale.errors import UnsafeNameError
from gpfm_scale.names import checked_component

NONFINITE = "the model gave non-finite features (NaN/inf in the stored feature_dtype)"


@dataclass(frozen=True)
class SlideVerdict:
    """A closed slide. `ok` ones still to publish carry their `parts` and an empty `file`."""

    slide_id: str
    ok: bool
    reason: str = ""
    file: str = ""
    n: int = 0
    n_corrupt: int = 0
    n_expected: int = 0
    parts: tuple[str, ...] = ()


@dataclass
class _OpenSlide:
    parts: list[str] = field(default_factory=list)
    n_rows: int = 0
    n_ok: int = 0
    n_corrupt: int = 0
    first_error: str = ""
    n_nonfinite: int = 0
    first_nonfinite: tuple[int, int] | None = None
    total: int | None = None
    shard_error: str = ""


class SlideCollector:
    """Adds up per-slide summaries; `expected` (slide -> tiler n_tiles) is None for shards without a manifest."""

    def __init__(self, expected: dict[str, int] | None, max_corrupt_fraction: float) -> None:
        self.expected = expected
        self.max_corrupt_fraction = max_corrupt_fraction
        self.open: dict[str, _OpenSlide] = {}
        self.closed: set[str] = set()

    def feed(self, summary: dict[str, np.ndarray]) -> list[SlideVerdict]:
        """Take one output block of the pipeline (`sink.SUMMARY_COLUMNS`); returns the slides it completed."""
        cols = {k: np.asarray(v).tolist() for k, v in summary.items()}
        touched = []
        for i, sid in enumerate(map(str, cols["slide_id"])):
            self._add(self.open.setdefault(sid, _OpenSlide()), {k: v[i] for k, v in cols.items()})
            touched.append(sid)
        done = []
        for sid in dict.fromkeys(touched):
            state = self.open[sid]
            if state.total is not None and state.n_rows >= state.total:
                done.append(self._close(sid))
        return done

    @staticmethod
    def _add(state: _OpenSlide, row: dict) -> None:
        if row["total"] >= 0:
            state.total = (state.total or 0) + int(row["total"])
            state.shard_error = state.shard_error or str(row["shard_error"])
        state.n_rows += int(row["n_tiles"])
        state.n_ok += int(row["n_ok"])
        state.n_corrupt += int(row["n_corrupt"])
        state.first_error = state.first_error or str(row["error"])
        if row["n_nonfinite"]:
            state.n_nonfinite += int(row["n_nonfinite"])
            state.first_nonfinite = state.first_nonfinite or (int(row["nonfinite_x"]), int(row["nonfinite_y"]))
        if row["part"]:
            state.parts.append(str(row["part"]))

    def _close(self, sid: str) -> SlideVerdict:
        state = self.open.pop(sid)
        if sid in self.closed:
            return SlideVerdict(sid, False, "tiles of this slide are in more than one shard (not a tiler output)")
        self.closed.add(sid)
        try:
            checked_component(sid, "slide id")
        except UnsafeNameError as err:
            return SlideVerdict(sid, False, str(err), n_corrupt=state.n_corrupt)
        expected = self.expected.get(sid, state.total) if self.expected is not None else state.total
        reason = self._fault(state, expected)
        if reason:
            return SlideVerdict(sid, False, reason, n_corrupt=state.n_corrupt)
        return SlideVerdict(sid, True, n=state.n_ok, n_corrupt=state.n_corrupt, n_expected=expected,
                            parts=tuple(state.parts))

    def _fault(self, state: _OpenSlide, expected: int) -> str:
        total = state.total or 0
        damage = f": {state.shard_error}" if state.shard_error else ""
        if total < expected:
            return f"{expected - total} of {expected} tiles missing from the shards{damage}"
        if total > expected:
            return f"{total} tiles in the shards but {expected} in the tiler manifest"
        if state.shard_error and self.expected is None:
            return f"slide cut short by a damaged shard{damage}"
        if state.n_nonfinite:
            return f"{NONFINITE} for {state.n_nonfinite} tile(s), the first at (x, y) = {state.first_nonfinite}"
        n_ok = total - state.n_corrupt
        if n_ok == 0:
            return f"no usable tile ({state.n_corrupt} undecodable): {state.first_error}"
        if state.n_corrupt > self.max_corrupt_fraction * expected:
            return (f"{state.n_corrupt} of {expected} tiles undecodable (max_corrupt_fraction "
                    f"{self.max_corrupt_fraction:g}): {state.first_error}")
        return ""

    def sweep(self, wanted: list[str]) -> list[SlideVerdict]:
        """At the end of the run: slides still open or never seen failed (their tiles never all arrived)."""
        out = []
        for sid in wanted:
            if sid in self.closed:
                continue
            state = self.open.pop(sid, None)
            seen = 0 if state is None else state.n_rows
            out.append(SlideVerdict(sid, False, f"only {seen} tile(s) of this slide were found in its shards"))
            self.closed.add(sid)
        for sid in list(self.open):
            out.append(SlideVerdict(sid, False, "incomplete: its read task ended without closing it"))
            self.closed.add(sid)
            del self.open[sid]
        return out


class ImageCollector:
    """Appends the features of good images to `images.h5` in arrival order; remembers each image's row."""

    def __init__(self, writer: ImageFeatureWriter, files: list[str]) -> None:
        self.writer = writer
        self.files = files
        self.rows = np.full(len(files), -1, np.int64)
        self.errors: dict[int, str] = {}

    def feed(self, batch: dict[str, np.ndarray]) -> int:
        """Returns the number of images embedded from this batch."""
        ok = np.asarray(batch["ok"], bool)
        idx = np.asarray(batch["row"], np.int64)
        for i, err in zip(idx[~ok], np.asarray(batch["error"])[~ok]):
            self.errors[int(i)] = str(err)
        nonfinite = ok & ~np.isfinite(batch["features"]).all(axis=1)
        for i in idx[nonfinite]:
            self.errors[int(i)] = f"{self.files[i]}: {NONFINITE}"
        ok &= ~nonfinite
        if ok.any():
            first = self.writer.append(batch["features"][ok], [self.files[i] for i in idx[ok]])
            self.rows[idx[ok]] = np.arange(first, first + int(ok.sum()))
        return int(ok.sum())
