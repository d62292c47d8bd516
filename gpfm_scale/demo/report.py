"""`OUT/report.md`: the three models compared, numbers as they are, then what each stage did and how long it took.

Every link is relative to `OUT`, so the folder can be moved or zipped. The per-dataset evaluation reports (with
their ROC and PCA figures and exact commands) are linked, not copied; this report adds the table across datasets,
the pretraining losses, and a plain statement of what the numbers can and cannot show (`report_text.py`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from gpfm_scale.demo import report_text
from gpfm_scale.demo.diagnostics import feature_spread, weight_change
from gpfm_scale.demo.run_record import Comparison, DemoRun, compare

REPORT = "report.md"


def _header(run: DemoRun) -> list[str]:
    return ["# gpfm-scale demo report", "",
            f"Command: `gpfm-scale demo --out {run.out}`  ", f"Written: {time.strftime('%Y-%m-%d %H:%M:%S')}  ",
            f"Wall time: {run.seconds:.0f} s; settings: [demo.json](demo.json)", "",
            ("Four stages ran on a local Ray instance: synthetic slides with known tissue classes (and the real CMU-1 "
            "slide) were tiled into WebDataset shards; a tiny GPFM student/teacher was pretrained on them with Ray "
            "Train + DeepSpeed, distilling the tiny experts tiny_a and tiny_b; three models embedded labelled patches "
            "with Ray Data; linear probes and kNN classified the features."), ""]


def _models(run: DemoRun) -> list[str]:
    names = run.model_names()
    lines = ["## Models", "", "| role | name in the tables | what it is |", "|---|---|---|"]
    for key, what in report_text.MODEL_ROLES.items():
        lines.append(f"| {key} | `{names[key]}` | {what} |")
    return lines + [""]


def _comparison(run: DemoRun, cmp: Comparison, change: float) -> list[str]:
    names = run.model_names()
    models = [names[k] for k in report_text.MODEL_ROLES]
    lines = ["## Result", "", ("Test-set value [95% bootstrap interval] (rank among the three; 1 = best) of each "
             "entry's ranking metric:"), "", "| dataset / task | metric | " + " | ".join(models) + " |",
             "|---|---|" + "---|" * len(models)]
    for entry in cmp.summary.scores.index:
        metric = cmp.rank_metric[entry]
        cells = [f"{cmp.table[m][entry][metric]} ({cmp.summary.ranks.at[entry, m]:g})" for m in models]
        lines.append(f"| {entry} | {metric} | " + " | ".join(cells) + " |")
    average = cmp.summary.average_rank
    lines.append("| **average rank** | | " + " | ".join(f"**{average[m]:.2f}**" for m in models) + " |")
    lines.append("| **first places** | | " + " | ".join(
        f"**{cmp.summary.first_places[m]} of {len(cmp.summary.scores)}**" for m in models) + " |")
    return lines + ["", *report_text.interpretation(run, cmp, change), ""]


def _tiling(run: DemoRun) -> list[str]:
    t, grid = run.tiling, run.cfg.tiling.grid
    resolution = f"{grid.target_mpp} µm/px" if grid.target_mpp else "the slides' level 0"
    manifest = pd.read_parquet(t.manifest)
    lines = ["## 1. Tiling", "",
             (f"{t.n_done}/{t.n_slides} slides done, {int(manifest['n_tiles'].fillna(0).sum())} tiles in the shards "
             f"([tiles/manifest.parquet](tiles/manifest.parquet)); this run wrote {t.n_tiles} of them "
             f"({t.n_bytes / 1e6:.1f} MB) in {t.seconds:.1f} s. Tiles are {grid.tile_px} px at {resolution}; "
             "zero-decode: the slide's own JPEG tiles were copied into the shards without decoding."), "",
             "| slide | status | tiles | reader | µm/px | zero-decode | thumbnail |", "|---|---|---|---|---|---|---|"]
    for r in manifest.to_dict("records"):
        thumb = f"![{r['slide_id']}](tiles/thumbnails/{r['slide_id']}.png)" if r["status"] == "done" else r["reason"]
        lines.append(f"| {r['slide_id']} | {r['status']} | {r['n_tiles']} | {r['reader']} | {r['mpp']} | "
                     f"{r['zero_decode']} | {thumb} |")
    return lines + [""]


def _embedding(run: DemoRun) -> list[str]:
    names = run.model_names()
    lines = ["## 3. Embedding", "", "| dataset | model | images | dim | spread | seconds | features |",
             "|---|---|---|---|---|---|---|"]
    for (ds, key), res in run.embeds.items():
        folder = run.rel(res.out)
        dim = report_text.feature_dim(Path(res.out))
        note = " (reused)" if res.n_skipped else ""
        lines.append(f"| {ds} | `{names[key]}` | {res.n_done} | {dim} | {feature_spread(Path(res.out)):.1e} | "
                     f"{res.seconds:.1f}{note} | [{folder}]({folder}) |")
    sources = ", ".join(f"[{ds}]({run.rel(folder)})" for ds, folder in run.datasets.items())
    return lines + ["", ("Spread: how much a model's stored features vary from patch to patch (mean per-dimension std "
                    "over patches / mean |value|; float16 storage resolves about 1e-3)."), "",
                    f"Labelled patches (class folders + labels.csv): {sources}. {report_text.DATASET_NOTES}", ""]


def _evaluation(run: DemoRun) -> list[str]:
    lines = ["## 4. Evaluation", "", (f"Tasks: {', '.join(run.cfg.tasks)}; {run.cfg.bootstrap} bootstrap resamples "
             f"of the test set; seed {run.cfg.seed}. Per dataset, the evaluation stage's own report (every metric, "
             "ROC curves, the command that reproduces it):"), ""]
    for ds, res in run.evals.items():
        lines.append(f"- {ds}: [{run.rel(res.report_md)}]({run.rel(res.report_md)}), "
                     f"[{run.rel(res.results_json)}]({run.rel(res.results_json)})")
    lines.append("")
    for ds, res in run.evals.items():
        figures = [Path(f) for f in res.figures if Path(f).name == "ranks.png" or Path(f).name.startswith("pca_")]
        if figures:
            lines += [f"### {ds}", "", *[f"![{ds}: {f.stem}]({run.rel(f)})" for f in figures], ""]
    return lines


def write_demo_report(run: DemoRun) -> Path:
    """Write OUT/report.md; returns its path."""
    cmp = compare(run)
    change = weight_change(run.pretrain.export_dir, run.random_init)
    lines = [*_header(run), *_models(run), *_comparison(run, cmp, change),
             *report_text.stages_table(run), *_tiling(run), *report_text.pretraining(run, change),
             *_embedding(run), *_evaluation(run)]
    path = run.out / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path
