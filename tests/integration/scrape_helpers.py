"""Scraping Prometheus endpoints over HTTP and parsing them with prometheus_client's own text parser."""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def scrape(url: str) -> dict[str, list[Sample]]:
    """Sample name (as exposed, e.g. `gpfm_tiling_tiles_written_total`) -> its samples."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list[Sample]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append(sample)
    return dict(out)


def ray_agent_url() -> str:
    """/metrics of the Ray metrics agent of this (single-node) test cluster."""
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels` (Ray adds its own labels beside ours)."""
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in {samples.get(name)}"
    return found[0]


def wait_for(url: str, names: Iterable[str], timeout_s: float = 60.0) -> dict[str, list[Sample]]:
    """Scrape until every name is present (Ray's agent exports on an interval), else fail naming the missing."""
    wanted, deadline = set(names), time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        missing = wanted - set(samples)
        if not missing:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"not exported by {url} within {timeout_s:.0f} s: {sorted(missing)}")
        time.sleep(0.5)
