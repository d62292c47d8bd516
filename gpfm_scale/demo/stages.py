"""The four stages as the demo calls them: the same public `run` functions the CLI sub-commands call, with configs
built from `DemoConfig`, plus the one thing no stage does: exporting a random-init teacher as a baseline.

Reuse on a rerun (same settings, same `--out`) is each stage's own resume: the tiler skips done slides, a
finished pretraining run (its export holds the last step) is kept and an interrupted one is resumed from its
checkpoint, and `embed` skips feature files that are complete for the same weights. Evaluation is always redone
(seconds); it is deterministic for a given seed.

The random-init baseline: `SSLMetaArch` built with the pretraining run's seed is exactly what the Ray Train worker
builds at step 0 (both build it with `train/build.py::build_model` from that seed), so exporting its teacher
with `export_teacher` gives the trained model's own initialisation, in the same export format; `embed` reads both
the same way. The comparison then isolates what the pretraining steps changed.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from gpfm_scale.config import build_config, load_config
from gpfm_scale.contracts.export import CONFIG_FILE, WEIGHTS_FILE
from gpfm_scale.demo.config import DemoConfig
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.stage import EmbedResult
from gpfm_scale.embed.stage import run as run_embed
from gpfm_scale.evaluate.config import EvaluateConfig
from gpfm_scale.evaluate.stage import EvaluateResult
from gpfm_scale.evaluate.stage import run as run_evaluate
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.stage import TilingResult
from gpfm_scale.tiling.stage import run as run_tiling
from gpfm_scale.train.pretrain_config import PretrainConfig

log = logging.getLogger(__name__)

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
RUN_NAME = "demo"
EXPERT = "expert:tiny_a"


@dataclass(frozen=True)
class PretrainOutcome:
    """Where the teacher is, and whether this run trained it or found it finished (`reused`)."""

    out: Path
    export_dir: Path
    steps: int
    seconds: float
    reused: bool


def tiling_config(cfg: DemoConfig) -> TilingConfig:
    """The demo's tiling settings (`DemoConfig.tiling`) on the demo's local Ray instance."""
    return TilingConfig(**cfg.tiling.model_dump())


def tile(cfg: DemoConfig, manifest: Path, out: Path) -> TilingResult:
    return run_tiling(tiling_config(cfg), str(manifest), str(out))


def pretrain_overrides(cfg: DemoConfig) -> dict[str, object]:
    """tiny.yaml, shortened: one checkpoint at the end, 1 CPU per worker, about 5 metric rows (each
    `ray.train.report` cost 1-2 s on a busy 2-core machine, 10x a tiny step: 40 steps took 159 s reporting every
    step and 75 s reporting once)."""
    return {"run.num_workers": cfg.pretrain_workers, "run.cpus_per_worker": 1, "run.total_iters": cfg.pretrain_steps,
            "run.checkpoint_every": cfg.pretrain_steps, "run.log_every": max(1, cfg.pretrain_steps // 5),
            "run.name": RUN_NAME,
            "run.seed": cfg.seed}


def pretrain_config(cfg: DemoConfig) -> PretrainConfig:
    return load_config(PretrainConfig, TINY_YAML, pretrain_overrides(cfg))


def exported_step(export_dir: Path) -> int | None:
    """The step recorded in an export's config.json, or None when there is no finished export."""
    path = export_dir / CONFIG_FILE
    if not (path.is_file() and (export_dir / WEIGHTS_FILE).is_file()):
        return None
    return int(json.loads(path.read_text()).get("step", -1))


def pretrain(cfg: DemoConfig, tiles: Path, out: Path) -> PretrainOutcome:
    """Train through the Ray Train + DeepSpeed stage, unless a finished run of the same length is there."""
    from gpfm_scale.train.stage import run as run_pretraining

    pcfg = pretrain_config(cfg)
    export = out / "export"
    if exported_step(export) == pcfg.run.total_iters:
        log.info("pretraining: %s already holds the step-%d teacher; reusing it", export, pcfg.run.total_iters)
        return PretrainOutcome(out, export, pcfg.run.total_iters, 0.0, reused=True)
    resume = (out / "checkpoints" / pcfg.run.name).is_dir()
    result = run_pretraining(pcfg, str(out), shards=str(tiles), resume=resume)
    return PretrainOutcome(out, Path(result.export_dir), result.steps, result.seconds, reused=False)


def export_random_init(cfg: DemoConfig, directory: Path) -> Path:
    """The pretraining run's step-0 teacher (same seed, same architecture), exported like a trained one."""
    from gpfm_scale.train.build import build_model
    from gpfm_scale.train.checkpoint import export_teacher

    if exported_step(directory) == 0:
        return directory
    pcfg = pretrain_config(cfg)
    with torch.random.fork_rng(devices=[]):
        model = build_model(pcfg.objective, pcfg.run.seed)
    export_teacher(model, pcfg.objective.model.backbone, directory, step=0, is_writer=True, crops=pcfg.crops)
    return directory


def embed_config(cfg: DemoConfig) -> EmbedConfig:
    return build_config(EmbedConfig, {"batch_size": cfg.batch_size, "input_kind": "images"}, "demo")


def embed(cfg: DemoConfig, model: str, images: Path, out: Path) -> EmbedResult:
    return run_embed(embed_config(cfg), model, str(images), str(out))


def evaluate_config(cfg: DemoConfig) -> EvaluateConfig:
    return build_config(EvaluateConfig, {"seed": cfg.seed, "bootstrap": cfg.bootstrap}, "demo")


def evaluate(cfg: DemoConfig, features: list[Path], out: Path) -> EvaluateResult:
    """One evaluation run over every model's features of one dataset; the report header holds the CLI command."""
    argv = ["gpfm-scale", "evaluate", *[a for f in features for a in ("--features", str(f))],
            "--task", ",".join(cfg.tasks), "--out", str(out), "--seed", str(cfg.seed),
            "--bootstrap", str(cfg.bootstrap)]
    return run_evaluate(evaluate_config(cfg), [str(f) for f in features], list(cfg.tasks), str(out),
                        command=shlex.join(argv))
