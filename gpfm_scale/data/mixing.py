"""`gpfm-scale mix`: rewrite the tiler's whole-slide shards into shards that each hold a uniform random sample of
the cohort's tiles, in random order, so that any run of a shard (hence any training batch) mixes the cohort.

Why: the tiler writes whole slides per shard (a failed slide must leave no tile behind), so a loader worker
reading a few shards at a time fills a 96-tile batch from a handful of slides, where GPFM drew tiles uniformly
from the whole cohort (dinov2 train/train.py:199-211, infinite shuffled sampler); KoLeo then pushes apart tiles
of one slide. Interleaving many open shards in the loader cannot close the gap at an affordable width: with K
shards open, a batch of B tiles sees at most ~K(1 - (1 - 1/K)^B) slides, so 90% of the uniform figure for
B = 96 needs K of several hundred open shards (and their read buffers) per loader worker. One offline pass fixes
it for every later epoch and run, and the loader stays what it was (same exact resume, bytes read ~1 per sample).

How (Ray Data): one read task per input shard, with our own tar reader (damage is detected and reported, nothing
is substituted); each sample goes to bucket blake2b(seed, key) mod M, where M = ceil(input bytes / shard_bytes);
`groupby(bucket)` moves the samples (Ray's hash shuffle); one write task per bucket sorts its samples by (key,
input shard, offset), permutes them with a generator seeded by (seed, bucket), and writes them with the tiler's
`ShardWriter` to `OUT/shards/{run_name}-{bucket:06d}.tar`, published atomically. The content of every output
shard is thus a function of (inputs, seed, shard_bytes) alone: a rerun of an unfinished mix writes the same bytes.
`OUT/mix.json` (inputs, outputs with sha256, problems) is written last; its presence marks a finished mix.

Costs: reads and writes the cohort once (disk: the output is as large as the input; the tiler's shards can go
afterwards); the whole cohort passes through Ray's object store during the shuffle (spilled to local disk when it
does not fit: plan free local disk of about the cohort's size, or set
`DataContext.use_disk_based_hash_shuffle`); each write task holds its hash partition in memory, one output shard
and sometimes 2-3 (3 x shard_bytes reserved); open files: one per read task and one per write task.
Throughput measured: benchmarks/RESULTS.md ("Mixing").

Damage: an input shard cut short gives the samples before the damage and is listed in `problems`; a malformed
sample (e.g. a duplicate member) is dropped and listed, and so is the second of two samples with one key.
Samples are copied as bytes, not decoded: an undecodable image reaches the loader, which skips it as always.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from gpfm_scale.atomic import write_bytes_atomic
from gpfm_scale.config import StrictModel
from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.shards import ShardWriter, shard_name
from gpfm_scale.data.tar_samples import iter_raw_samples, shard_size
from gpfm_scale.errors import ConfigError, GpfmError, ShardError
from gpfm_scale.run_lock import OutputLock

logger = logging.getLogger(__name__)

MANIFEST_NAME = "mix.json"
_WORKER_BYTES = 512 * 2**20  # a Ray worker with torch imported (measured ~450 MiB), on top of the shard it holds
_REPORT = -1  # bucket of the per-input report rows (one per input shard), next to the samples in the shuffle


class MixConfig(StrictModel):
    """How the tiler's shards are rewritten into cohort-mixed training shards."""

    seed: int = Field(default=0, ge=0, description="Seeds which output shard each tile goes to and the order "
                      "inside it. The mix is a function of (inputs, seed, shard_bytes).")
    shard_bytes: int = Field(
        default=1_000_000_000, ge=4096, le=1_500_000_000,
        description="Target bytes per output shard: M = ceil(input bytes / shard_bytes) shards of about this "
        "size. A write task holds one shard in memory (Arrow binary columns cap a block near 2 GB).")
    run_name: str = Field(default="mixed", pattern=r"^[A-Za-z0-9_.]+$",
                          description="Output shard prefix: OUT/shards/{run_name}-{NNNNNN}.tar.")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join; default: RAY_ADDRESS, else a local instance.")


@dataclass(frozen=True)
class MixResult:
    out: str
    manifest: str
    n_inputs: int
    n_shards: int
    n_samples: int
    n_bytes: int
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def samples_per_second(self) -> float:
        return self.n_samples / max(self.seconds, 1e-9)


def input_urls(spec: str | list[str]) -> list[str]:
    """A tiler output dir (its shards/), a shards dir, a glob, brace notation or a list -> shard URLs."""
    from gpfm_scale.data.shard_stream import expand_shard_urls  # here: Ray workers need not import the loader

    if isinstance(spec, str) and "://" not in spec and os.path.isdir(spec):
        spec = os.path.join(spec, "shards", "*.tar") if os.path.isdir(os.path.join(spec, "shards")) \
            else os.path.join(spec, "*.tar")
    return expand_shard_urls(spec)


def bucket_of(key: str, seed: int, num_buckets: int) -> int:
    """The output shard of sample `key`: a keyed hash, uniform over buckets and stable across processes."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8,
                             salt=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") % num_buckets


def _read_shard(batch: dict[str, np.ndarray], seed: int, num_buckets: int) -> dict[str, list[Any]]:
    """Ray Data map_batches (one input shard per call) -> its sample rows plus one report row (bucket -1)."""
    url, source = str(batch["url"][0]), int(batch["source"][0])
    rows: dict[str, list[Any]] = {"key": [], "source": [], "offset": [], "exts": [], "payloads": [], "bucket": []}
    report: dict[str, Any] = {"url": url, "samples": 0, "problems": []}
    try:
        for raw in iter_raw_samples(url):
            if raw.error:
                report["problems"].append(f"{raw.key} in {url}: {raw.error}; sample dropped")
                continue
            rows["key"].append(raw.key)
            rows["source"].append(source)
            rows["offset"].append(raw.offset)
            rows["exts"].append(list(raw.files))
            rows["payloads"].append(list(raw.files.values()))
            rows["bucket"].append(bucket_of(raw.key, seed, num_buckets))
            report["samples"] += 1
    except ShardError as err:
        report["problems"].append(f"{err} ({report['samples']} samples before the damage kept)")
    for name, value in (("key", json.dumps(report)), ("source", source), ("offset", -1), ("exts", []),
                        ("payloads", []), ("bucket", _REPORT)):
        rows[name].append(value)
    return rows


def _write_bucket(table: Any, seed: int, run_name: str, out_url: str) -> dict[str, list[Any]]:
    """Ray Data map_groups: the samples of one bucket -> one shard, published; returns its record (or, for the
    report group, the per-input reports)."""
    bucket = int(table.column("bucket")[0].as_py())
    keys = table.column("key").to_pylist()
    if bucket == _REPORT:
        return {"bucket": [_REPORT] * len(keys), "info": keys}
    sources, offsets = table.column("source").to_pylist(), table.column("offset").to_pylist()
    canonical = sorted(range(len(keys)), key=lambda i: (keys[i], sources[i], offsets[i]))
    # A key met twice (a slide tiled twice, overlapping inputs) goes to one bucket; written next to each other
    # the two would read back as one sample with duplicate members. The first (by input order) is kept.
    duplicates = [i for i, prev in zip(canonical[1:], canonical) if keys[i] == keys[prev]]
    dropped = set(duplicates)
    canonical = [i for i in canonical if i not in dropped]
    order = [canonical[i] for i in np.random.default_rng([seed, bucket]).permutation(len(canonical))]
    exts, payloads = table.column("exts"), table.column("payloads")
    out = OutputDir(out_url)
    writer = ShardWriter(out.local_tmp_dir(), max_bytes=2**62)
    writer.begin_slide()
    try:
        for i in order:
            writer.add(keys[i], dict(zip(exts[i].as_py(), payloads[i].as_py())))
        writer.commit_slide(run_name, len(order))
        sealed = writer.seal()
    except BaseException:
        writer.abort()
        raise
    assert sealed is not None
    name = shard_name(run_name, bucket)
    out.publish(sealed.tmp_path, "shards", name)
    info = {"name": name, "samples": sealed.num_samples, "bytes": sealed.num_bytes, "sha256": sealed.sha256,
            "duplicates": [f"duplicate key {keys[i]} (input shard {sources[i]}) dropped" for i in duplicates]}
    return {"bucket": [bucket], "info": [json.dumps(info)]}


def _check_out(out: OutputDir, cfg: MixConfig, urls: list[str]) -> None:
    """Refuse a finished mix and inputs inside the output's shards/ (a later glob would take both); clear what a
    killed run of this config left (outputs are recomputed identically)."""
    if out.exists(MANIFEST_NAME):
        raise ConfigError(f"{out.url} already holds a finished mix ({MANIFEST_NAME}); use another --out")
    shards_dir = out.path("shards")
    inside = [u for u in urls if os.path.abspath(u).startswith(shards_dir + "/")] if out.is_local else \
        [u for u in urls if u.startswith(out.url + "/shards/")]
    if inside:
        raise ConfigError(f"input shard {inside[0]} lies in {out.url}/shards: mix into another --out")
    out.fs.makedirs(out.path("shards", ".tmp"), exist_ok=True)
    stale = out.fs.glob(out.path("shards", f"{cfg.run_name}-*.tar"))
    stale += out.fs.ls(out.path("shards", ".tmp"), detail=False)
    for path in stale:
        out.fs.rm(path)
    if stale:
        logger.info("removed %d files left by an unfinished mix in %s", len(stale), out.url)


def _shuffle(cfg: MixConfig, urls: list[str], num_buckets: int, out_url: str) -> list[dict[str, Any]]:
    """The Ray Data pipeline: read tasks -> hash shuffle by bucket -> write tasks; returns their records."""
    import ray

    from gpfm_scale.ray_utils import ensure_ray

    ensure_ray(cfg.ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"url": u, "source": i} for i, u in enumerate(urls)], override_num_blocks=len(urls))
    ds = ds.map_batches(_read_shard, batch_size=1, fn_kwargs={"seed": cfg.seed, "num_buckets": num_buckets})
    # A partition per bucket (Ray hashes buckets onto partitions, so a write task gets one bucket, sometimes 2-3).
    grouped = ds.groupby("bucket", num_partitions=num_buckets + 1)
    ds = grouped.map_groups(_write_bucket, batch_format="pyarrow", memory=3 * cfg.shard_bytes + _WORKER_BYTES,
                            fn_kwargs={"seed": cfg.seed, "run_name": cfg.run_name, "out_url": out_url})
    try:
        return ds.take_all()
    except ray.exceptions.RayError as err:
        raise _user_error(err) from err


def _user_error(err: BaseException) -> GpfmError:
    """Ray wraps an error raised in a task (often twice); hand back ours as is, anything else as one line."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, GpfmError):
            return cause
        nested = getattr(cause, "cause", None) or cause.__cause__
        cause = nested if nested is not cause else None
    lines = [line for line in str(err).splitlines() if line.strip()]
    return GpfmError(f"mixing pipeline failed: {lines[-1][:500] if lines else type(err).__name__}")


def run(cfg: MixConfig, shards: str | list[str], out_url: str) -> MixResult:
    """Mix the shards `shards` (see `input_urls`) into `out_url`/shards; write `out_url`/mix.json last."""
    start = time.perf_counter()
    urls = input_urls(shards)
    sizes = [shard_size(u) for u in urls]
    num_buckets = max(1, math.ceil(sum(sizes) / cfg.shard_bytes))
    out = OutputDir(out_url)
    with OutputLock(out.url, "mix"):
        _check_out(out, cfg, urls)
        logger.info("mixing %d shards (%.1f MB) into %d shards of ~%.1f MB", len(urls), sum(sizes) / 1e6,
                    num_buckets, sum(sizes) / num_buckets / 1e6)
        records = _shuffle(cfg, urls, num_buckets, out.url)
        reports = sorted((json.loads(r["info"]) for r in records if r["bucket"] == _REPORT), key=lambda r: r["url"])
        written = sorted((json.loads(r["info"]) for r in records if r["bucket"] != _REPORT), key=lambda r: r["name"])
        problems = [p for r in reports for p in r["problems"]] + [p for w in written for p in w.pop("duplicates")]
        n_samples = sum(w["samples"] for w in written)
        if not n_samples:
            raise ShardError(f"no sample in the {len(urls)} input shards: {'; '.join(problems)[:500]}")
        n_read, n_dropped = sum(r["samples"] for r in reports), sum(p.startswith("duplicate key") for p in problems)
        if n_samples + n_dropped != n_read:
            raise ShardError(f"mix lost samples: read {n_read}, wrote {n_samples}, dropped {n_dropped} duplicates")
        out.fs.rm(out.path("shards", ".tmp"), recursive=True)
        manifest = {"config": cfg.model_dump(mode="json"), "inputs": reports, "shards": written,
                    "problems": problems}
        data = json.dumps(manifest, indent=1).encode()
        if out.is_local:
            write_bytes_atomic(out.path(MANIFEST_NAME), data)  # umask-respecting, unlike mkstemp's 0600
        else:
            out.write_bytes_atomic(data, MANIFEST_NAME)
    for problem in problems:
        logger.warning("%s", problem)
    return MixResult(out=out.url, manifest=out.path(MANIFEST_NAME), n_inputs=len(urls), n_shards=len(written),
                     n_samples=n_samples, n_bytes=sum(w["bytes"] for w in written),
                     seconds=time.perf_counter() - start, problems=problems)
