"""`run(cfg, model_spec, input_path, out, tile_slides) -> EmbedResult`: embed a cohort with any model through Ray Data.

Inputs: the tiler's output (or bare shards), a slide manifest (tiled first into `OUT/tiles/` by `tile_slides`, the
tiling stage as `gpfm_scale/embed_command.py` hands it in: its resume, failure records, coordinates and thumbnails
come for free, and the tiles serve every later model), or an image folder. Reading, decoding and resizing run as
Ray Data tasks, the model in an actor pool (`predictor.build_pipeline`). For slides the actors write the features
(`sink.py`: per-batch parts, published per slide as `features/{slide_id}.h5` by a Ray task) and the driver receives
only per-slide summaries (`collect.py`), a few bytes per tile instead of the feature; it writes the index, failure
table and run record (layout: `contracts/features.py`). Image folders' features come back to the driver, which
writes the one `images.h5`.

Resume: a slide is skipped when `features/{slide_id}.h5` exists, was made with the same model (weights
fingerprint) and holds every tile of the tiler manifest (rows + recorded undecodable tiles = n_tiles); a file is
only ever published whole, and parts or half-written files of a killed run are wiped first. Slides that
failed embedding are retried on every run; slides that failed tiling follow `tiling.retry_failed`. Failures go to
`OUT/failed.parquet` (slide_id, stage, reason), never into the index, which lists only slides with features.
Writing into an `OUT` embedded with another model is refused. `OUT` may be a bucket URL (s3://, gs://): every
file is then uploaded whole (`gpfm_scale.storage`); a relative `OUT` inside a submitted Ray job is refused.

One run per `OUT`: the run holds `OUT/.gpfm.lock` (`run_lock.OutputLock`) from before it reads or writes anything
there to its end; a second run exits 2 naming the holder. A bad item fails alone, with its reason in
failed.parquet: a slide id that is not one safe path component (tar key `../../x/0_0.jpg`, manifest slide_id `..`),
an undecodable or unconvertible image, non-finite features (see `collect.py`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gpfm_scale import storage
from gpfm_scale.config import dump_config
from gpfm_scale.contracts import features as store
from gpfm_scale.contracts.coords import coords_parts, read_geometry
from gpfm_scale.embed import sink
from gpfm_scale.embed.collect import ImageCollector, SlideCollector, SlideVerdict
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.inputs import TileSource, detect_kind, list_image_folder, load_tile_source, shard_names
from gpfm_scale.embed.models import ModelInfo, describe_model
from gpfm_scale.embed.progress import EmbedProgress
from gpfm_scale.errors import ConfigError, GpfmError, UnsafeNameError
from gpfm_scale.metrics import EMBED, serve_metrics
from gpfm_scale.names import checked_component
from gpfm_scale.run_lock import OutputLock

log = logging.getLogger(__name__)

FAILED = "failed.parquet"
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception): .*)$")
RUN_FILE = "embed.json"


@dataclass(frozen=True)
class EmbedResult:
    out: str
    index: str
    kind: str  # "slide" or "image"
    model: str
    n_items: int  # slides (or images) in the input
    n_done: int  # with features, skipped ones included
    n_skipped: int  # already complete before this run
    n_failed: int
    n_embedded: int  # tiles / images run through the model in this run
    n_corrupt: int  # undecodable tiles / images met in this run
    seconds: float
    failed: list[tuple[str, str]] = field(default_factory=list)
    startup_seconds: float = 0.0  # run start -> first features back (tiling, Ray workers, actors, model build)
    driver_bytes: int = 0  # bytes of the pipeline's output blocks the driver received (summaries, for slides)

    @property
    def images_per_second(self) -> float:
        return self.n_embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.n_failed == 0


def run(cfg: EmbedConfig, model_spec: str, input_path: str, out: str,
        tile_slides: Callable[[str, str], None] | None = None) -> EmbedResult:
    """Embed `input_path` (shards, slide manifest or image folder) with `model_spec` into `out`, resuming.

    `tile_slides(slides, tiles_dir)` tiles a slide input into `tiles_dir` (under `out`, inside this run's lock);
    without it a slide input is refused (this stage does not import the tiling stage)."""
    start = time.perf_counter()
    out_dir = storage.resolve_out(out)
    info = describe_model(model_spec, cfg)
    kind = detect_kind(input_path, cfg.input_kind)
    if kind == "slides" and tile_slides is None:
        raise ConfigError(f"--input {input_path} holds slides: they must be tiled first (`gpfm-scale embed` does it, "
                          "or run `gpfm-scale tile` and embed its output)")
    with OutputLock(out_dir, "embed"):
        _claim_output(out_dir, info, cfg)
        log.info("embedding %s (%s) with %s (dim %d, %d px)", input_path, kind, info.name, info.dim,
                 info.contract.size)
        if cfg.metrics_port is not None:
            _serve_metrics(cfg)
        if kind == "images":
            return _run_images(cfg, info, input_path, out_dir, start)
        if kind == "slides":
            tile_slides(input_path, storage.join(out_dir, "tiles"))
            input_path = storage.join(out_dir, "tiles")
        return _run_tiles(cfg, info, load_tile_source(input_path), out_dir, start)


def _serve_metrics(cfg: EmbedConfig) -> None:
    """Start the metrics endpoint; a port in use is the user's setting to change (exit 2), not a traceback."""
    try:
        serve_metrics(cfg.metrics_port, cfg.metrics_host)
    except OSError as err:
        raise ConfigError(f"metrics_port {cfg.metrics_port} on {cfg.metrics_host}: {err.strerror or err}; "
                          "choose another --metrics-port (0 picks a free one)") from None


def _claim_output(out_dir: str, info: ModelInfo, cfg: EmbedConfig) -> None:
    """Refuse an output holding features of another model or precision; record this run's model and config."""
    run_file = storage.join(out_dir, RUN_FILE)
    if storage.isfile(run_file) and storage.listdir(storage.join(out_dir, "features")):
        try:
            old = json.loads(storage.read_bytes(run_file))
        except ValueError as err:
            raise ConfigError(f"{run_file} is not valid JSON ({err}); restore it or use a new --out") from None
        if old.get("fingerprint") != info.fingerprint:
            raise ConfigError(f"{out_dir} holds features of {old.get('model')} (weights {old.get('fingerprint')}); "
                              f"{info.name} has weights {info.fingerprint}: use a new --out")
        if old.get("feature_dtype", "float16") != cfg.feature_dtype:
            raise ConfigError(f"{out_dir} holds {old.get('feature_dtype', 'float16')} features; this run would add "
                              f"{cfg.feature_dtype} ones: use a new --out (or the same feature_dtype)")
    record = {"model": info.name, "fingerprint": info.fingerprint, "dim": info.dim, "input_size": info.contract.size,
           "feature_dtype": cfg.feature_dtype}
    storage.write_bytes(run_file, (json.dumps(record, indent=2) + "\n").encode())
    storage.write_bytes(storage.join(out_dir, "config.yaml"), dump_config(cfg).encode())


@dataclass(frozen=True)
class _Stream:
    embedded: int = 0
    corrupt: int = 0
    startup_seconds: float = 0.0
    driver_bytes: int = 0


def _stream(tasks: list[dict[str, Any]], info: ModelInfo, cfg: EmbedConfig, total: int | None,
            feed: Callable[[dict[str, np.ndarray]], tuple[int, int, str]], start: float,
            parts_out: str | None = None) -> _Stream:
    """Run the pipeline over `tasks`, handing each output block to `feed` (-> embedded, corrupt, bar note);
    `parts_out`: the actors write slide features there (`sink.py`)."""
    import ray

    from gpfm_scale.embed.predictor import build_pipeline, plan_resources, wait_for_cluster
    from gpfm_scale.ray_utils import ensure_ray

    ensure_ray(cfg.ray_address)
    plan = plan_resources(cfg, wait_for_cluster(cfg))
    log.info("starting %d inference actor(s) on %s (%g CPU, %g GPU each), batch %d", plan.num_actors, plan.device,
             plan.cpus_per_actor, plan.gpus_per_actor, cfg.batch_size)
    embedded = corrupt = received = 0
    first: float | None = None
    bar = EmbedProgress(total)
    try:
        blocks = build_pipeline(tasks, info, cfg, plan, parts_out).iter_batches(batch_size=None,
                                                                                  batch_format="numpy")
        for block in blocks:
            received += sum(np.asarray(v).nbytes for v in block.values())
            n_ok, n_bad, note = feed(block)
            first = first or time.perf_counter()
            embedded, corrupt = embedded + n_ok, corrupt + n_bad
            EMBED.images.inc(n_ok)
            EMBED.corrupt_samples.inc(n_bad)
            EMBED.images_per_second.set(bar.advance(n_ok, n_bad, note))
    except ray.exceptions.RayError as err:
        raise GpfmError(f"embedding pipeline failed: {root_cause(err)}") from err
    finally:
        bar.close()
    return _Stream(embedded, corrupt, (first or time.perf_counter()) - start, received)


def root_cause(err: BaseException) -> str:
    """The user-facing reason inside a Ray failure: Ray wraps an error raised in an actor or task (often twice) and
    keeps the original only as the last `module.TypeError: message` line of its text."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = getattr(err, "cause", None) or err.__cause__
    for e in chain:
        found = [m.group(1) for m in map(_ERROR_LINE.match, str(e).splitlines()) if m]
        if found:
            return found[-1][:500]
    first_line = next(iter(str(chain[0]).strip().splitlines()), "")
    return f"{type(chain[0]).__name__}: {first_line[:500]}"


# ----------------------------------------------------------------------------------------------------- slides

def complete_features(path: str, fingerprint: str, expected: int | None) -> tuple[int, int] | None:
    """(n, n_corrupt) when `path` is a finished feature file of this model covering `expected` tiles, else None."""
    if not storage.isfile(path):
        return None
    try:
        with storage.open_h5(path) as f:
            n, attrs = len(f["features"]), dict(f.attrs)
    except (OSError, KeyError):
        log.warning("%s is unreadable; embedding its slide again", path)
        return None
    n_corrupt, n_expected = int(attrs.get("n_corrupt", -1)), int(attrs.get("n_expected", -1))
    if attrs.get("model_fingerprint") != fingerprint or n + n_corrupt != n_expected:
        return None
    return (n, n_corrupt) if expected is None or n_expected == expected else None


@dataclass
class _SlidePlan:
    todo: dict[str, list[str]]  # shard -> slides to embed from it (without a manifest: every shard, [])
    expected: dict[str, int] | None
    done: dict[str, tuple[int, int]]
    failed: list[dict[str, str]]
    order: list[str]


def _plan_slides(source: TileSource, info: ModelInfo, out_dir: str) -> _SlidePlan:
    feats = storage.join(out_dir, "features")
    if source.manifest is None:
        stems = [n.removesuffix(".h5") for n in storage.listdir(feats) if n.endswith(".h5")]
        done = {stem: r for stem in stems if stem != "images"
                and (r := complete_features(storage.join(feats, f"{stem}.h5"), info.fingerprint, None)) is not None}
        return _SlidePlan({s: [] for s in source.shards}, None, done, [], [])
    plan = _SlidePlan({}, {}, {}, [], [])
    for row in source.manifest.to_dict("records"):
        sid, status = str(row["slide_id"]), row["status"]
        plan.order.append(sid)
        n_tiles = int(row["n_tiles"] or 0) if status == "done" else 0
        unsafe = _unsafe_names(sid, shard_names(row["shards"]) if status == "done" else [])
        if unsafe:
            plan.failed.append({"slide_id": sid, "stage": "embedding", "reason": unsafe})
        elif status != "done":
            reason = row["reason"] if isinstance(row["reason"], str) and row["reason"] else \
                f"not tiled (status {status} in the tiler manifest)"
            plan.failed.append({"slide_id": sid, "stage": "tiling", "reason": reason})
        elif n_tiles == 0:
            plan.failed.append({"slide_id": sid, "stage": "tiling", "reason": "no tiles (no tissue found)"})
        elif (r := complete_features(storage.join(feats, f"{sid}.h5"), info.fingerprint, n_tiles)) is not None:
            plan.done[sid] = r
        else:
            plan.expected[sid] = n_tiles
            for name in shard_names(row["shards"]):
                plan.todo.setdefault(source.shard_url(str(name)), []).append(sid)
    return plan


def _unsafe_names(slide_id: str, shards: list[str]) -> str:
    """Why a tiler-manifest row cannot be used (its slide id or a shard name is not one safe path component)."""
    try:
        checked_component(slide_id, "slide id")
        for name in shards:
            checked_component(name, "shard name")
    except UnsafeNameError as err:
        return str(err)
    return ""


def _coords_attrs(source: TileSource, sid: str) -> dict[str, Any]:
    """The tiler's CLAM/TRIDENT geometry attributes for the slide (local or bucket tiling outputs), else none."""
    if source.root is None:
        return {}
    path = storage.join(source.root, *coords_parts(sid))
    return read_geometry(path) if storage.isfile(path) else {}


def _run_tiles(cfg: EmbedConfig, info: ModelInfo, source: TileSource, out_dir: str, start: float) -> EmbedResult:
    sink.clear_scratch(out_dir)
    plan = _plan_slides(source, info, out_dir)
    skipped = set(plan.done)
    EMBED.slides.labels(status="skipped").inc(len(skipped))
    if source.manifest is None:
        tasks = [{"shard": s, "exclude": sorted(skipped)} for s in plan.todo]
    else:
        tasks = [{"shard": s, "include": sids} for s, sids in plan.todo.items()]
    collector = SlideCollector(plan.expected, cfg.max_corrupt_fraction)
    verdicts: list[SlideVerdict] = []
    log.info("%d slide(s) already embedded, %d shard(s) to read", len(skipped), len(tasks))

    def record(final: list[SlideVerdict]) -> None:
        verdicts.extend(final)
        for v in final:
            EMBED.slides.labels(status="done" if v.ok else "failed").inc()
            if not v.ok:
                log.warning("FAILED %s: %s", v.slide_id, v.reason)

    def feed(block: dict[str, np.ndarray]) -> tuple[int, int, str]:
        for v in collector.feed(block):
            record(publisher.submit(v, _slide_attrs(info, v), _coords_attrs(source, v.slide_id)) if v.ok else [v])
        record(publisher.finished())
        return int(np.sum(block["n_ok"])), int(np.sum(block["n_corrupt"])), f"slides {len(verdicts)}"

    stream, publisher = _Stream(), sink.Publisher(out_dir, info.name)
    try:
        if tasks:
            total = sum(plan.expected.values()) if plan.expected is not None else None
            stream = _stream(tasks, info, cfg, total, feed, start, parts_out=out_dir)
        verdicts.extend(collector.sweep(list(plan.expected or {})))
    finally:  # what finished is recorded even when the pipeline fails: a rerun resumes from it
        record(publisher.drain())
        sink.clear_scratch(out_dir)
        failed = _write_slide_outputs(out_dir, source, plan, verdicts)
    n_done = len(plan.done) + sum(v.ok for v in verdicts)
    return _result(out_dir, "slide", info, stream, start, n_items=n_done + len(failed), n_done=n_done,
                   n_skipped=len(skipped), failed=[(f["slide_id"], f"{f['stage']}: {f['reason']}") for f in failed])


def _slide_attrs(info: ModelInfo, v: SlideVerdict) -> dict[str, Any]:
    """The feature file's resume bookkeeping (`complete_features`)."""
    return {"model_fingerprint": info.fingerprint, "n_expected": v.n_expected, "n_corrupt": v.n_corrupt,
            "input_size": info.contract.size}


def _result(out_dir: str, kind: str, info: ModelInfo, stream: _Stream, start: float, **counts: Any) -> EmbedResult:
    return EmbedResult(out=out_dir, index=storage.join(out_dir, store.INDEX), kind=kind, model=info.name,
                       n_failed=len(counts["failed"]), n_embedded=stream.embedded, n_corrupt=stream.corrupt,
                       seconds=time.perf_counter() - start, startup_seconds=stream.startup_seconds,
                       driver_bytes=stream.driver_bytes, **counts)


def _write_slide_outputs(out_dir: str, source: TileSource, plan: _SlidePlan,
                         verdicts: list[SlideVerdict]) -> list[dict[str, str]]:
    """index.parquet (done slides, manifest order, clinical columns carried) and failed.parquet; returns the
    failure rows."""
    done = {sid: (f"features/{sid}.h5", n, nc) for sid, (n, nc) in plan.done.items()}
    done.update({v.slide_id: (v.file, v.n, v.n_corrupt) for v in verdicts if v.ok})
    extras: dict[str, dict[str, Any]] = {}
    if source.manifest is not None:
        cols = ["slide_id", *source.extra_columns]
        extras = {str(r["slide_id"]): r for r in source.manifest[cols].to_dict("records")}
    order = plan.order or sorted(done)
    rows = [{"slide_id": sid, "kind": "slide", "file": done[sid][0], "row": -1, "n": done[sid][1],
             "n_corrupt": done[sid][2]} | {k: v for k, v in extras.get(sid, {}).items() if k != "slide_id"}
            for sid in order if sid in done]
    store.write_index(out_dir, rows)
    failed = plan.failed + [{"slide_id": v.slide_id, "stage": "embedding", "reason": v.reason}
                            for v in verdicts if not v.ok]
    store.write_parquet(storage.join(out_dir, FAILED), pd.DataFrame(failed, columns=["slide_id", "stage", "reason"]))
    return failed


# ----------------------------------------------------------------------------------------------------- images

def _run_images(cfg: EmbedConfig, info: ModelInfo, root: str, out_dir: str, start: float) -> EmbedResult:
    table = list_image_folder(root)
    files = table["file"].tolist()
    existing = _complete_images(storage.join(out_dir, store.IMAGES_FILE), info, files)
    stream = _Stream()
    if existing is not None:
        rows, errors = existing, _previous_failures(out_dir)
        log.info("%s is complete for this model and these %d images: nothing to do", store.IMAGES_FILE, len(files))
    else:
        writer = store.ImageFeatureWriter(out_dir, info.name, info.dim, {
            "model_fingerprint": info.fingerprint, "n_expected": len(files), "input_size": info.contract.size},
            dtype=cfg.feature_dtype)
        collector = ImageCollector(writer, files)
        step = cfg.images_per_task
        tasks = [{"root": root, "files": files[i:i + step], "first_row": i} for i in range(0, len(files), step)]

        def feed(block: dict[str, np.ndarray]) -> tuple[int, int, str]:
            n_ok = collector.feed(block)
            return n_ok, len(block["ok"]) - n_ok, ""

        try:
            stream = _stream(tasks, info, cfg, len(files), feed, start)
        except BaseException:
            writer.abort()
            raise
        writer.close({"n_corrupt": len(collector.errors)})
        rows, errors = collector.rows, {files[i].rsplit(".", 1)[0]: e for i, e in collector.errors.items()}
    index = table.rename(columns={"file": "image"})
    index.insert(0, "slide_id", [f.rsplit(".", 1)[0] for f in files])
    index.insert(1, "kind", "image")
    index.insert(2, "file", store.IMAGES_FILE)
    index.insert(3, "row", rows)
    index.insert(4, "n", 1)
    index = index[index["row"] >= 0]
    store.write_index(out_dir, index.to_dict("records"))
    failed = [{"slide_id": sid, "stage": "embedding", "reason": r} for sid, r in errors.items()]
    store.write_parquet(storage.join(out_dir, FAILED), pd.DataFrame(failed, columns=["slide_id", "stage", "reason"]))
    return _result(out_dir, "image", info, stream, start, n_items=len(files), n_done=len(index),
                   n_skipped=len(files) if existing is not None else 0,
                   failed=[(f["slide_id"], f["reason"]) for f in failed])


def _complete_images(path: str, info: ModelInfo, files: list[str]) -> np.ndarray | None:
    """Row of each listed image in a finished images.h5 of this model over exactly these files, else None."""
    if not storage.isfile(path):
        return None
    with storage.open_h5(path) as f:
        attrs = dict(f.attrs)
        stored = {p.decode() if isinstance(p, bytes) else str(p): i for i, p in enumerate(f["paths"][:])}
    if attrs.get("model_fingerprint") != info.fingerprint or int(attrs.get("n_expected", -1)) != len(files) or \
            len(stored) + int(attrs.get("n_corrupt", 0)) != len(files) or not set(stored) <= set(files):
        return None
    return np.asarray([stored.get(f, -1) for f in files], np.int64)


def _previous_failures(out_dir: str) -> dict[str, str]:
    path = storage.join(out_dir, FAILED)
    if not storage.isfile(path):
        return {}
    table = pd.read_parquet(io.BytesIO(storage.read_bytes(path)))
    return {str(sid): str(r) for sid, r in table[["slide_id", "reason"]].itertuples(index=False)}
