"""The demo report's prose and small tables: stage timings with the equivalent CLI commands, the pretraining losses,
and the reading of the comparison, written from the numbers (whichever way they fall), never assumed."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from gpfm_scale.demo import stages
from gpfm_scale.demo.diagnostics import FLOAT16_RESOLUTION, feature_spread, layerscale_gain
from gpfm_scale.demo.run_record import Comparison, DemoRun
from gpfm_scale.tiling.config import TilingSettings

MODEL_ROLES = {
    "trained": "the EMA teacher of the demo's pretraining run, exported after its last step",
    "random-init": "the same run's teacher at step 0 (same seed, same architecture), exported the same way",
    "tiny-expert": "`tiny_a`, the tiny random-init test expert that the student distils (a stand-in for UNI)",
}
MODEL_SPECS = {"trained": "pretrain/export", "random-init": "random-init/export", "tiny-expert": stages.EXPERT}
DATASET_NOTES = ("synthetic-tissue: the tiler's tiles of the synthetic slides, labelled by the tissue class covering "
                 "most of each tile (mixed tiles left out), tested on a held-out slide. hgsc-nuclei: a seeded subset "
                 "of the real nucleus crops (at most `patches_per_class` per class), split at random.")
GPFM_SCALE = "GPFM trains 500,000 steps of 1,536 images on ~190M tiles"


def feature_dim(features_dir: Path) -> int:
    return int(json.loads((features_dir / "embed.json").read_text())["dim"])


def _dotted(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def tiling_sets(tiling: TilingSettings) -> list[str]:
    """`--set KEY=VALUE` for each of the demo's tiling settings that is not the tiler's default."""
    default, ours = _dotted(TilingSettings().model_dump(mode="json")), _dotted(tiling.model_dump(mode="json"))
    return [arg for key, value in ours.items() if value != default[key]
            for arg in ("--set", f"{key}={json.dumps(value)}")]


def stage_commands(run: DemoRun) -> dict[str, list[str]]:
    """The CLI commands that redo each stage from OUT (the demo calls the same functions)."""
    cfg = run.cfg
    sets = [a for k, v in stages.pretrain_overrides(cfg).items() if k not in ("run.num_workers", "run.total_iters")
            for a in ("--set", f"{k}={v}")]
    return {
        "tiling": [shlex.join(["gpfm-scale", "tile", "--slides", "slides/manifest.csv", "--out", "tiles",
                               *tiling_sets(cfg.tiling)])],
        "pretraining": [shlex.join(["gpfm-scale", "pretrain", "--config", str(stages.TINY_YAML), "--shards",
                                    "tiles", "--out", "pretrain", "--workers", str(cfg.pretrain_workers), "--steps",
                                    str(cfg.pretrain_steps), *sets])],
        "embedding": [f"gpfm-scale embed --model MODEL --input patches/{ds} --out features/{ds}/KEY "
                      f"--batch-size {cfg.batch_size} --set input_kind=images" for ds in run.datasets],
        "evaluation": [json.loads(Path(r.results_json).read_text())["command"] for r in run.evals.values()],
    }


def stages_table(run: DemoRun) -> list[str]:
    outputs = {"slides": "slides", "tiling": "tiles", "pretraining": "pretrain", "embedding": "features",
               "evaluation": "evaluation"}
    commands = stage_commands(run)
    lines = ["## Stages", "", "| stage | seconds | output | the same from the command line (run in this folder) |",
             "|---|---|---|---|"]
    for name, seconds in run.times.items():
        cmds = "<br>".join(f"`{c}`" for c in commands.get(name, [])) or "(Python: `gpfm_scale.demo.data`)"
        lines.append(f"| {name} | {seconds:.1f} | [{outputs[name]}]({outputs[name]}) | {cmds} |")
    keys = ", ".join(f"`{spec}` -> `{key}`" for key, spec in MODEL_SPECS.items())
    lines += ["", (f"Embedding, MODEL -> KEY: {keys}. The random-init export has no command of its own "
              "(`gpfm_scale.demo.stages.export_random_init`).")]
    note = ("This run reused the finished stages of an earlier run into this folder (same settings): the times "
            "are this run's, mostly checks. " if run.pretrain.reused else "")
    return lines + ["", note + "The times include starting Ray Train workers and Ray Data actors, which dominate "
                    "at this size.", ""]


def _loss_terms(rows: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in rows[0] if k == "total" or k.startswith(("dino", "ibot", "koleo", "expert/"))]
    return sorted(keys, key=lambda k: (k != "total", k))


def pretraining(run: DemoRun, change: float) -> list[str]:
    """Section 2: the run, its first and last losses, and how far the teacher moved."""
    p = run.pretrain
    rows = [json.loads(line) for line in (p.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = list({int(r["step"]): r for r in rows}.values())  # a resumed run may repeat steps: keep the latest
    first, last = min(rows, key=lambda r: r["step"]), max(rows, key=lambda r: r["step"])
    batch = stages.pretrain_config(run.cfg).loader.batch_size
    rate = pd.Series([r["images_per_s"] for r in rows]).median()
    lines = ["## 2. Pretraining", "",
             (f"{p.steps} steps of {batch} images per worker on {run.cfg.pretrain_workers} Ray Train worker(s) "
             f"(DeepSpeed ZeRO-2 on CPU, median {rate:.0f} images/s); config [pretrain/config.yaml]"
             "(pretrain/config.yaml), losses and timings in [pretrain/metrics.jsonl](pretrain/metrics.jsonl). The "
             f"exported teacher ([pretrain/export](pretrain/export)) is {change:.2%} (relative L2 distance) away "
             "from its initialisation, exported beside it as the random-init baseline ([random-init/export]"
             "(random-init/export))."), "",
             f"| loss term | step {int(first['step'])} | step {int(last['step'])} |", "|---|---|---|"]
    terms = _loss_terms(rows)
    lines += [f"| {k} | {first[k]:.4f} | {last[k]:.4f} |" for k in terms]
    fell = [k for k in terms if last[k] < first[k]]
    rose = [k for k in terms if last[k] >= first[k]]
    moved = f"From step {int(first['step'])} to step {int(last['step'])} these fell: {', '.join(fell) or 'none'}"
    return lines + ["", moved + (f"; these did not: {', '.join(rose)}." if rose else ".") + " Single steps are noisy "
                    f"(a batch of {batch} images); metrics.jsonl has a row every "
                    f"{stages.pretrain_overrides(run.cfg)['run.log_every']} step(s).", ""]


def _paired(cmp: Comparison, a: str, b: str) -> tuple[int, int, int]:
    """(entries where a scores higher than b, where the two 95% intervals overlap, entries)."""
    better = overlap = 0
    for entry in cmp.summary.scores.index:
        ma, mb = (cmp.table[m][entry][cmp.rank_metric[entry]] for m in (a, b))
        better += int(ma.value > mb.value)
        if ma.ci_low is not None and ma.ci_high is not None and mb.ci_low is not None and mb.ci_high is not None:
            overlap += int(ma.ci_low <= mb.ci_high and mb.ci_low <= ma.ci_high)
    return better, overlap, len(cmp.summary.scores)


def interpretation(run: DemoRun, cmp: Comparison, change: float) -> list[str]:
    """What the table says about trained vs random init, and why, from the numbers of this run."""
    names = run.model_names()
    trained, init, expert = names["trained"], names["random-init"], names["tiny-expert"]
    avg = cmp.summary.average_rank
    better, overlap, n = _paired(cmp, trained, init)
    if avg[trained] < avg[init]:
        verdict = (f"The trained teacher ranks ahead of its own random initialisation (average rank "
                   f"{avg[trained]:.2f} vs {avg[init]:.2f}; higher on {better} of {n} entries)")
    elif avg[trained] == avg[init]:
        verdict = f"The trained teacher and its random initialisation tie (average rank {avg[trained]:.2f} each)"
    else:
        verdict = (f"The trained teacher does not beat its own random initialisation here (average rank "
                   f"{avg[trained]:.2f} vs {avg[init]:.2f}; higher on {better} of {n} entries)")
    verdict += (f", and on {overlap} of the {n} entries the two 95% intervals overlap, so this run does not "
                "establish a difference there." if overlap else ".")
    batch = stages.pretrain_config(run.cfg).loader.batch_size
    steps, workers = run.pretrain.steps, run.cfg.pretrain_workers
    tiles = int(pd.read_parquet(run.tiling.manifest)["n_tiles"].fillna(0).sum())
    why = (f"Scale: {steps} CPU steps of {batch * workers} images ({steps * batch * workers / max(tiles, 1):.1f} "
           f"passes over {tiles} tiles) moved the teacher's weights {change:.2%} from where they started (the EMA "
           f"teacher follows the student slowly), while {GPFM_SCALE}. At this size the demo shows that the four "
           "stages run end to end and what they produce; it cannot show whether pretraining helps, whichever way "
           "the table falls. A random ViT whose blocks act from the start (tiny_a has no LayerScale) is also a "
           "strong baseline for probes and kNN on small patch sets whose classes differ in colour, as the synthetic "
           "tissue classes do.")
    notes = [*_layerscale_note(run),
             (f"`{expert}` is a random-init tiny ViT with a fixed seed (the test stand-in for UNI, whose weights are "
              "gated files), so it is a random baseline here, not a pathology expert.")]
    if "hgsc-nuclei" in run.datasets:
        notes.append("hgsc-nuclei crops come from only two images, so train and test crops are neighbours and "
                     "every number on it is optimistic.")
    return [verdict, "", why, "", " ".join(notes)]


def _layerscale_note(run: DemoRun) -> list[str]:
    """Why a step-0 teacher can score at chance: its features are constant to within float16 rounding."""
    init_gain, trained_gain = layerscale_gain(run.random_init), layerscale_gain(run.pretrain.export_dir)
    spreads = {key: max(feature_spread(Path(res.out)) for (_, k), res in run.embeds.items() if k == key)
               for key in ("trained", "random-init")}
    if init_gain is None or trained_gain is None or spreads["random-init"] >= 2 * FLOAT16_RESOLUTION:
        return []
    init_spread, where = spreads["random-init"], "below" if spreads["random-init"] < FLOAT16_RESOLUTION else "about"
    return [(f"The random-init teacher's features barely depend on the image: LayerScale starts at {init_gain:.0e} "
             "(the GPFM recipe), so its blocks add almost nothing to the CLS token. Its stored features vary across "
             f"patches by {init_spread:.1e} of their size, {where} float16's resolution (~1e-3; embed stores "
             f"float16), so what tells its patches apart is mostly rounding. {run.pretrain.steps} steps grew the "
             f"LayerScale gains to {trained_gain:.0e} and the spread to {spreads['trained']:.1e}: much of the gap "
             "between the two teachers is this, not learned tissue features.")]
