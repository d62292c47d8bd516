"""Start-up benchmark (issue 13.11): whole-command time of a local `gpfm-scale tile`, in-process vs Ray actors.

Each measurement is a fresh Python process, as a command is: it imports the CLI module (the command's import
cost), builds the tiling config the CLI builds from its defaults, and runs `tiling.stage.run` with an `on_commit`
hook that notes the wall-clock time of the first commit. Reported per run, from the moment the process is spawned:
`first_s`, time to the first tile written (its shard committed: durable, what a rerun resumes from; a one-slide
run commits at its end, so this includes the whole slide), and `wall_s`, the whole command up to process exit
(Ray's shutdown included). `--in-process always` vs `never`: the same code path with and without a Ray instance.

`--big WxH` also synthesizes one slide of that size (`slides/synthetic.py`, reused when present) and compares the
whole-command tiles/s of the in-process and the Ray run with the OpenSlide + PIL baseline script of `bench_tiling.py` (one
process: imports, OpenSlide read_region, PIL JPEG encode, one file per tile) on the same grid.

Run: PYTHONPATH=. python benchmarks/bench_startup.py [--slide SVS] [--repeats 3] [--big 40000x30000] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_startup")

SMALL_SLIDE = "/work/shared/data/cmu-1-small-region.svs"
MODES = ("always", "never")


def _config(mode: str):  # -> TilingConfig; imported here so the parent process stays light
    from gpfm_scale.config import build_config
    from gpfm_scale.tiling.config import TilingConfig

    return build_config(TilingConfig, {"in_process": mode, "device": "cpu", "run_name": "bench"})


def child(mode: str, slide: str, out: str) -> None:
    """One command's worth of work; prints the first commit's time and the tiles written as one JSON line."""
    from gpfm_scale.tiling.stage import run

    importlib.import_module("gpfm_scale.cli")  # the command's imports, timed as the command pays them

    first: list[float] = []
    result = run(_config(mode), slide, out, on_commit=lambda _sealed: first or first.append(time.time()))
    print(json.dumps({"first": first[0] if first else None, "tiles": result.n_tiles}), flush=True)


def time_command(mode: str, slide: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, slide, str(out)], env=env,
                          capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"mode": mode, "first_s": got["first"] - t0, "wall_s": wall, "tiles": got["tiles"]}


def time_baseline(slide: str, work: Path) -> dict:
    """The OpenSlide + PIL script on the grid ours cuts, as one whole process (imports included)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_tiling import BenchSlide, baseline_job, plan_slide_grid

    job = baseline_job(BenchSlide(Path(slide).stem, slide), plan_slide_grid(BenchSlide("s", slide),
                                                                             _config("always")), work / "base")
    spec = work / "job.json"
    spec.write_text(json.dumps({**job.__dict__, "coords": list(job.coords)}))
    code = ("import json, sys; sys.path.insert(0, %r); from bench_tiling import BaselineJob, baseline_slide; "
            "d = json.load(open(%r)); d['coords'] = tuple(map(tuple, d['coords'])); "
            "print(baseline_slide(BaselineJob(**d))[0])") % (str(Path(__file__).parent), str(spec))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"mode": "baseline", "wall_s": time.time() - t0, "tiles": int(proc.stdout.strip().splitlines()[-1])}


def measure(slide: str, repeats: int, work: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(repeats):
        for mode in MODES:  # interleaved: a load swing on the shared cores hits both modes alike
            runs[mode].append(time_command(mode, slide, work / f"{mode}{r}"))
            log.info("%s", runs[mode][-1])
    return runs


def summary(runs: dict[str, list[dict]]) -> dict:
    med = {m: {k: statistics.median(x[k] for x in rs) for k in ("first_s", "wall_s")} for m, rs in runs.items()}
    return {"median": med, "tiles": runs["always"][0]["tiles"],
            "ray_over_in_process_wall": med["never"]["wall_s"] / med["always"]["wall_s"],
            "ray_over_in_process_first": med["never"]["first_s"] / med["always"]["first_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SLIDE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--slide", default=SMALL_SLIDE)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", help="WxH: also synthesize one slide this size and compare with the baseline")
    ap.add_argument("--work", help="scratch folder (default: a temporary one; a --big slide is kept there)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_startup_"))
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg": os.getloadavg()}, "slide": args.slide,
              "small": summary(measure(args.slide, args.repeats, work / "small"))}
    if args.big:
        from gpfm_scale.slides.synthetic import write_synthetic_slide

        w, h = (int(v) for v in args.big.lower().split("x"))
        big = work / f"big{w}x{h}.svs"
        if not big.exists():  # written aside, then renamed: an interrupted write is never reused
            partial = big.with_name(f".{big.stem}.partial.svs")
            write_synthetic_slide(partial, w, h, mpp=0.25, tile=256, levels=4, seed=0)
            os.replace(partial, big)
        ours = time_command("always", str(big), work / "big_ours")
        ray_run = time_command("never", str(big), work / "big_ray")
        base = time_baseline(str(big), work)
        rate = {k: r["tiles"] / r["wall_s"] for k, r in (("ours", ours), ("ray", ray_run), ("baseline", base))}
        report["big"] = {"size": args.big, "ours": ours, "ours_ray": ray_run, "baseline": base,
                         "whole_command_x": rate["ours"] / rate["baseline"],
                         "whole_command_x_ray": rate["ray"] / rate["baseline"]}
    report["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
