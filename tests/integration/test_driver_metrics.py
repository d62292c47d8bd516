"""The driver's Prometheus endpoint, scraped over HTTP while real tiling and embedding runs feed it.

Counters are process-wide (a driver may run several stages), so the test reads them before and after each run
and checks the difference against what the run itself reports. Pretraining's metrics come from Ray workers
through Ray's metrics agent: tests/integration/test_pretrain.py scrapes those.
"""

from __future__ import annotations

import pandas as pd
import pytest

from gpfm_scale.config import build_config
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.stage import run as embed
from gpfm_scale.metrics import CATALOGUE, serve_metrics
from gpfm_scale.slides.synthetic import write_corrupt_slide
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import run as tile
from tests.integration.scrape_helpers import scrape, value
from tests.integration.tiling_helpers import make_cohort
from tests.ports import free_port

pytestmark = pytest.mark.usefixtures("ray_session")


def _total(samples, name: str, **labels: str) -> float:
    """A counter's value, 0 when it has not been exported yet (a labelled child appears on first use)."""
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    return found[0] if found else 0.0


def test_tiling_and_embedding_feed_every_driver_metric(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{serve_metrics(port)}/metrics"
    manifest = make_cohort(tmp_path / "cohort", 2)
    write_corrupt_slide(tmp_path / "cohort" / "broken.svs")
    rows = pd.read_csv(manifest).to_dict("records") + [{"slide_id": "broken", "path": str(tmp_path / "cohort" /
                                                                                           "broken.svs")}]
    pd.DataFrame(rows).to_csv(manifest, index=False)
    before = scrape(url)

    tiling_cfg = build_config(TilingConfig, {"grid": {"tile_px": 32, "max_tiles_per_slide": 20, "min_tissue_fraction": 0.25},
                                             "workers": 2, "encoding": "png", "thumbnails": False,
                                             "metrics_port": port})
    tiled = tile(tiling_cfg, str(manifest), str(tmp_path / "tiles"))
    after_tiling = scrape(url)
    assert (tiled.n_done, tiled.n_failed) == (2, 1) and tiled.n_tiles > 0

    def grew(name: str, **labels: str) -> float:
        return _total(after_tiling, name, **labels) - _total(before, name, **labels)

    assert grew("gpfm_tiling_tiles_written_total") == tiled.n_tiles
    assert grew("gpfm_tiling_written_bytes_total") == tiled.n_bytes
    assert grew("gpfm_tiling_slides_total", status="done") == 2
    assert grew("gpfm_tiling_slides_total", status="failed") == 1
    assert grew("gpfm_tiling_shards_written_total") >= 1
    assert grew("gpfm_tiling_worker_restarts_total") == 0
    assert value(after_tiling, "gpfm_tiling_tiles_per_second") > 0

    embed_cfg = build_config(EmbedConfig, {"batch_size": 16, "num_actors": 1, "read_tasks": 2, "metrics_port": port})
    embedded = embed(embed_cfg, "expert:tiny_a", str(tmp_path / "tiles"), str(tmp_path / "features"))
    after = scrape(url)
    assert embedded.n_done == 2 and embedded.n_embedded == tiled.n_tiles
    assert _total(after, "gpfm_embed_images_total") - _total(after_tiling, "gpfm_embed_images_total") == tiled.n_tiles
    done = _total(after, "gpfm_embed_slides_total", status="done") - _total(after_tiling, "gpfm_embed_slides_total",
                                                                            status="done")
    assert done == 2
    assert _total(after, "gpfm_embed_corrupt_samples_total") == _total(after_tiling, "gpfm_embed_corrupt_samples_total")
    assert value(after, "gpfm_embed_images_per_second") > 0

    driver_names = {s.exposed_name for s in CATALOGUE if s.recorded_in == "driver"}
    assert driver_names <= set(after), sorted(driver_names - set(after))
