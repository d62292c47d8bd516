"""`gpfm-scale demo`: every stage, end to end, on a local Ray instance with small real and synthetic slides.

It writes a few synthetic two-class slides (and uses the real CMU-1 SVS from ../shared/data when present), tiles them,
and ends with a Markdown report. It is the quickest way to see that an install works; each later stage adds itself
here.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd

from gpfm_scale.config import build_config
from gpfm_scale.slides.synthetic import write_synthetic_slide
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import TilingResult
from gpfm_scale.tiling.stage import run as run_tiling

log = logging.getLogger(__name__)

REAL_SLIDE_CANDIDATES = ("../shared/data/cmu-1-small-region.svs", "shared/data/cmu-1-small-region.svs")


def find_real_slide() -> str | None:
    """The small real SVS that ships beside the repository, if it is there (GPFM_DATA_DIR overrides)."""
    env = os.environ.get("GPFM_DATA_DIR")
    candidates = [os.path.join(env, "cmu-1-small-region.svs")] if env else list(REAL_SLIDE_CANDIDATES)
    return next((os.path.abspath(c) for c in candidates if os.path.isfile(c)), None)


def write_demo_slides(folder: Path, n_synthetic: int = 4) -> pd.DataFrame:
    """Synthetic slides with two tissue classes (label = the dominant class), plus the real slide if present."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_synthetic):
        path = folder / f"synthetic-{i}.svs"
        label = "a" if i % 2 == 0 else "b"
        if not path.exists():
            write_synthetic_slide(path, 3072, 2304, mpp=0.25, tile=256, levels=3, seed=100 + i, classes=(label,))
        rows.append({"slide_id": path.stem, "path": str(path), "label": label, "case_id": f"case-{i}"})
    real = find_real_slide()
    if real:
        rows.append({"slide_id": "cmu-1-small-region", "path": real, "label": "skin", "case_id": "cmu-1"})
    else:
        log.warning("real slide not found (%s); the demo uses synthetic slides only", REAL_SLIDE_CANDIDATES[0])
    table = pd.DataFrame(rows)
    table.to_csv(folder / "manifest.csv", index=False)
    return table


def demo_tiling_config() -> TilingConfig:
    """Small tiles at 0.5 µm/px (20x) so the demo runs in well under a minute on two CPU cores."""
    return build_config(TilingConfig, {"grid": {"tile_px": 224, "target_mpp": 0.5, "max_tiles_per_slide": 200}},
                        "demo")


def write_report(out: Path, tiling: TilingResult) -> Path:
    manifest = pd.read_parquet(tiling.manifest)
    lines = [
        "# gpfm-scale demo report", "",
        f"Command: `gpfm-scale demo --out {out}`  ", f"Written: {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
        "## Stage 1: tiling", "",
        f"{tiling.n_done}/{tiling.n_slides} slides done, {tiling.n_tiles} tiles, {tiling.n_bytes / 1e6:.1f} MB of "
        f"shards in {tiling.seconds:.1f} s ({tiling.tiles_per_second:.0f} tiles/s).", "",
        "| slide | status | tiles | reader | µm/px | zero-decode | thumbnail |", "|---|---|---|---|---|---|---|",
    ]
    for r in manifest.to_dict("records"):
        thumb = f"![{r['slide_id']}](tiles/thumbnails/{r['slide_id']}.png)" if r["status"] == "done" else r["reason"]
        lines.append(f"| {r['slide_id']} | {r['status']} | {r['n_tiles']} | {r['reader']} | {r['mpp']} | "
                     f"{r['zero_decode']} | {thumb} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_demo(out_dir: str) -> int:
    out = Path(out_dir).resolve()
    start = time.perf_counter()
    write_demo_slides(out / "slides")
    tiling = run_tiling(demo_tiling_config(), str(out / "slides" / "manifest.csv"), str(out / "tiles"))
    report = write_report(out, tiling)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    print(f"  slides:      {out / 'slides'}")
    print(f"  shards:      {out / 'tiles' / 'shards'}")
    print(f"  coordinates: {out / 'tiles' / 'coords'}")
    print(f"  thumbnails:  {out / 'tiles' / 'thumbnails'}")
    print(f"  manifest:    {tiling.manifest}")
    print(f"  report:      {report}")
    return 0 if tiling.ok else 1
