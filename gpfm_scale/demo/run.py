"""`run_demo(out_dir, cfg) -> exit code`: tile -> pretrain -> embed -> evaluate, then one report linking it all.

Console output: `gpfm-scale demo` is a command a person watches, so this module (and only this one in the
package) prints a line per stage with its time, and the report's path last; everything else logs.

Reruns into the same folder: `OUT/demo.json` records the settings. With the same settings every finished stage is
reused (see `demo/stages.py`), so a second `make demo` takes seconds of work plus Ray's start and re-evaluation.
With other settings, or a folder written by an older demo without `demo.json` (it has slides/manifest.csv), the
demo's own sub-folders are removed first and everything is redone: mixing tiles, weights or features made with
other settings would make the report lie. Nothing else in `OUT` is touched, and a folder that holds one of those
names without being a demo folder is refused rather than cleaned.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpfm_scale.demo import stages
from gpfm_scale.demo.config import DemoConfig
from gpfm_scale.demo.data import HGSC, find_data_dir, write_demo_slides, write_hgsc_subset, write_synthetic_patches
from gpfm_scale.demo.report import write_demo_report
from gpfm_scale.demo.run_record import DemoRun
from gpfm_scale.errors import ConfigError
from gpfm_scale.ray_utils import ensure_ray

log = logging.getLogger(__name__)

STAMP = "demo.json"
OWNED = ("slides", "tiles", "pretrain", "random-init", "patches", "features", "evaluation", "report.md", STAMP)
SYNTHETIC = "synthetic-tissue"


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


@contextmanager
def _stage(times: dict[str, float], name: str, number: str) -> Iterator[None]:
    _say(f"{number} {name} ...")
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start
    _say(f"{number} {name}: done in {times[name]:.1f} s")


def prepare_output(out: Path, cfg: DemoConfig) -> bool:
    """Make `out` ready for these settings; returns True when earlier results (same settings) are reused."""
    stamp = out / STAMP
    wanted = cfg.model_dump(mode="json")
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return True
    stale = [out / name for name in OWNED if (out / name).exists()]
    if stale and not stamp.is_file() and not (out / "slides" / "manifest.csv").is_file():
        raise ConfigError(f"{out} holds {', '.join(p.name for p in stale)} but is not a demo folder (no {STAMP}, no "
                          "slides/manifest.csv): use a new --out")
    if stale:
        _say(f"{out} holds a demo run with other settings (or an older demo): removing its "
             f"{', '.join(p.name for p in stale)} and starting clean")
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    return False


def _datasets(out: Path, cfg: DemoConfig) -> dict[str, Path]:
    """name -> labelled image folder: the synthetic tissue tiles always, hgsc-nuclei when the data is there."""
    folders = {SYNTHETIC: write_synthetic_patches(out / "tiles", out / "patches" / SYNTHETIC, cfg)}
    data = find_data_dir(cfg)
    if cfg.use_hgsc and data is not None and (data / HGSC).is_dir():
        folders[HGSC] = write_hgsc_subset(data / HGSC, out / "patches" / HGSC, cfg)
    elif cfg.use_hgsc:
        log.warning("%s not found (data folder: %s); evaluating on synthetic tissue only", HGSC, data)
    return folders


def run_demo(out_dir: str, cfg: DemoConfig | None = None) -> int:
    """Run every stage into `out_dir` and write `out_dir/report.md`; 0 when every slide tiled, else 1."""
    cfg = cfg or DemoConfig()
    out = Path(out_dir).resolve()
    start = time.perf_counter()
    reused = prepare_output(out, cfg)
    _say(f"writing to {out}" + (" (reusing the finished stages of an earlier run)" if reused else ""))
    ensure_ray()
    times: dict[str, float] = {}
    with _stage(times, "slides", "0/4"):
        manifest = write_demo_slides(out / "slides", cfg)
    with _stage(times, "tiling", "1/4"):
        tiling = stages.tile(cfg, manifest, out / "tiles")
    with _stage(times, "pretraining", "2/4"):
        trained = stages.pretrain(cfg, out / "tiles", out / "pretrain")
        random_init = stages.export_random_init(cfg, out / "random-init" / "export")
    models = {"trained": str(trained.export_dir), "random-init": str(random_init), "tiny-expert": stages.EXPERT}
    with _stage(times, "embedding", "3/4"):
        datasets = _datasets(out, cfg)
        embeds = {(ds, key): stages.embed(cfg, spec, folder, out / "features" / ds / key)
                  for ds, folder in datasets.items() for key, spec in models.items()}
    with _stage(times, "evaluation", "4/4"):
        evals = {ds: stages.evaluate(cfg, [out / "features" / ds / key for key in models], out / "evaluation" / ds)
                 for ds in datasets}
    report = write_demo_report(DemoRun(cfg, out, tiling, trained, random_init, datasets, embeds, evals, times,
                                       time.perf_counter() - start))
    _say(f"finished in {time.perf_counter() - start:.0f} s")
    for ds, result in evals.items():
        _say(f"  evaluation ({ds}): {result.report_md}")
    _say(f"report: {report}")
    return 0 if tiling.ok else 1
