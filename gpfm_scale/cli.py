"""`gpfm-scale`: one command, a sub-command per stage. This module only parses and dispatches.

Every stage option maps onto a config key; `--set key=value` reaches any key not given its own option, and
`--print-config` shows the resolved config (all defaults included) without running anything.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import shlex
import sys
from typing import Any, Sequence

import yaml

from gpfm_scale.config import StrictModel, describe_config, load_config
from gpfm_scale.errors import GpfmError

log = logging.getLogger("gpfm_scale")


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GpfmError(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


# One real key of each sub-command's config for its `--set` help (tests check that each exists in that config).
SET_EXAMPLES = {"tile": "tissue.close_px=9", "mix": "shard_bytes=500000000", "pretrain": "optim.clip_grad=3.0",
                "embed": "feature_dtype=float32", "evaluate": "knn.k=20"}
# The config model of each sub-command, imported only when its help is shown (parsing stays light).
CONFIG_MODELS = {"tile": "gpfm_scale.tiling.config:TilingConfig", "mix": "gpfm_scale.data.mixing:MixConfig",
                 "pretrain": "gpfm_scale.train.pretrain_config:PretrainConfig",
                 "embed": "gpfm_scale.embed_command:EmbedCommandConfig",
                 "evaluate": "gpfm_scale.evaluate.config:EvaluateConfig"}
# What a sub-command needs to run; not needed for --print-config, so argparse does not require them.
RUN_INPUTS = {"tile": ("--slides", "--out"), "mix": ("--shards", "--out"), "embed": ("--model", "--input", "--out"),
              "evaluate": ("--features", "--task", "--out")}


@functools.lru_cache(maxsize=None)
def config_defaults(cmd: str) -> dict[str, Any]:
    """Dotted config key -> its default, from the sub-command's config model (the one place defaults are written)."""
    module, _, name = CONFIG_MODELS[cmd].partition(":")
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(getattr(importlib.import_module(module), name)().model_dump(mode="json"), "")
    return flat


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its real default: the config model's for options that set a config key (their
    argparse default is None, meaning "not given"), argparse's own for the rest. Nothing is restated by hand."""

    def __init__(self, prog: str, cmd: str | None = None) -> None:
        super().__init__(prog)
        self.cmd = cmd

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        default = action.default
        if default is None and self.cmd in CONFIG_MODELS:
            default = config_defaults(self.cmd).get(action.dest)
        if default is None or default is False or default == []:
            return text
        return f"{text} (default: {str(default).replace('%', '%%')})"


def _subparser(sub: Any, cmd: str, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(cmd, formatter_class=functools.partial(_DefaultsFormatter, cmd=cmd), **kwargs)


def _add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Logging level.")


def _add_common(p: argparse.ArgumentParser, cmd: str) -> None:
    p.add_argument("--config", help="YAML file with config keys that differ from the defaults.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"Override any config key, dotted for nesting (e.g. --set {SET_EXAMPLES[cmd]}). Repeatable.")
    p.add_argument("--print-config", action="store_true",
                   help="Print the resolved config (every key, its value and what it means) as YAML and exit.")
    _add_log_level(p)


def _tile_parser(sub: Any) -> None:
    p = _subparser(sub, "tile", help="Cut whole-slide images into WebDataset shards (stage 1).",
                       description="Tile slides into DIR/shards/*.tar, DIR/coords/*.h5, DIR/thumbnails/*.png and "
                                   "DIR/manifest.parquet. Rerunning the same command resumes: finished slides are "
                                   "skipped, interrupted ones redone, failed ones retried only with --retry-failed.")
    p.add_argument("--slides",
                   help="Slide manifest (CSV/Parquet with slide_id, path[, mpp, clinical columns]; an mpp column "
                        "overrides the slide's own), a folder, or a glob. Local paths or fsspec URLs (s3://, gs://).")
    p.add_argument("--out", help="Output directory (local path or fsspec URL).")
    p.add_argument("--target-mpp", type=float, dest="grid.target_mpp",
                   help="µm/px of the written tiles (resampled from the nearest finer level); omit for GPFM's "
                        "native level-0 tiles.")
    p.add_argument("--target-magnification", type=float, dest="grid.target_magnification",
                   help="Alternative to --target-mpp: objective power of the written tiles (20 = 0.5 µm/px).")
    p.add_argument("--tile-px", type=int, dest="grid.tile_px", help="Tile side in output pixels.")
    p.add_argument("--stride-px", type=int, dest="grid.stride_px", help="Grid step in output pixels (default: tile).")
    p.add_argument("--min-tissue", type=float, dest="grid.min_tissue_fraction",
                   help="Minimum tissue fraction of a kept tile (0..1).")
    p.add_argument("--max-tiles", type=int, dest="grid.max_tiles_per_slide",
                   help="Cap per slide, sampled with a fixed seed (GPFM: 2000). 0 means no cap.")
    p.add_argument("--workers", type=int, dest="workers", help="Tiling actors (default: cluster CPUs).")
    p.add_argument("--retry-failed", action="store_const", const=True, dest="retry_failed",
                   help="Retry slides that failed in an earlier run into the same --out.")
    p.add_argument("--metrics-port", type=int, dest="metrics_port",
                   help="Serve Prometheus metrics on PORT while running (127.0.0.1 unless --metrics-host).")
    p.add_argument("--metrics-host", dest="metrics_host", help="Address the metrics endpoint binds.")
    p.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: RAY_ADDRESS or local).")
    _add_common(p, "tile")


def _pretrain_parser(sub: Any) -> None:
    p = _subparser(sub, "pretrain", help="Train the GPFM student/teacher with Ray Train + DeepSpeed (stage 2).",
                       description="Pretrain on the tiler's shards. Writes DIR/checkpoints/ (resume with --resume), "
                                   "DIR/export/model.safetensors + config.json (the teacher, loadable with plain timm) "
                                   "and DIR/metrics.jsonl. Configs: gpfm_scale/configs/tiny.yaml (CPU, minutes), "
                                   "gpfm_scale/configs/vitl14_gpfm.yaml (the GPFM recipe).")
    p.add_argument("--shards", help="Tiler output dir, shards dir, glob or comma-separated shard URLs "
                                    "(default: loader.shards of the config).")
    p.add_argument("--out", default="pretrain-output", help="Output directory (shared by all nodes).")
    p.add_argument("--resume", action="store_true", help="Continue the run in --out from its newest checkpoint.")
    p.add_argument("--workers", type=int, dest="run.num_workers", help="Ray Train workers.")
    p.add_argument("--steps", type=int, dest="run.total_iters", help="Total optimiser steps.")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], dest="deepspeed.zero_stage", help="ZeRO stage.")
    p.add_argument("--ray-address", dest="run.ray_address", help="Ray cluster address (default: RAY_ADDRESS or local).")
    _add_common(p, "pretrain")


def _mix_parser(sub: Any) -> None:
    p = _subparser(sub, "mix", help="Rewrite the tiler's shards into cohort-mixed training shards (before pretrain).",
                       description="Shuffle every tile of the input shards across DIR/shards/{run_name}-NNNNNN.tar "
                                   "(each a uniform random sample of the cohort, in random order) with Ray Data, so "
                                   "that training batches mix slides; writes DIR/mix.json last.")
    p.add_argument("--shards", help="Tiler output dir, shards dir, glob or brace notation.")
    p.add_argument("--out", help="Output directory (local path or fsspec URL).")
    p.add_argument("--seed", type=int, dest="seed", help="Seed of the mix.")
    p.add_argument("--shard-bytes", type=int, dest="shard_bytes", help="Target bytes per output shard.")
    p.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: RAY_ADDRESS or local).")
    _add_common(p, "mix")


def _embed_parser(sub: Any) -> None:
    p = _subparser(sub, "embed", help="Embed tiles of a cohort (or labelled patches) with a model (stage 3).",
                       description="Map a model over the tiler's shards, a slide manifest (tiled first into "
                                   "DIR/tiles/) or an image folder (class/image.png) with Ray Data. Writes "
                                   "DIR/features/{slide_id}.h5 (features + coords, CLAM/TRIDENT layout), "
                                   "DIR/index.parquet and DIR/failed.parquet. Rerunning resumes.")
    p.add_argument("--model",
                   help="An export directory of `gpfm-scale pretrain`, expert:NAME, or timm:NAME (local weights).")
    p.add_argument("--input", help="Tiler output / shards, a slide manifest, or an image folder.")
    p.add_argument("--out", help="Output directory.")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="Images per forward pass.")
    p.add_argument("--workers", type=int, dest="num_actors", help="Inference actors (usually one per GPU).")
    p.add_argument("--metrics-port", type=int, dest="metrics_port",
                   help="Serve Prometheus metrics on PORT while running (127.0.0.1 unless --metrics-host).")
    p.add_argument("--metrics-host", dest="metrics_host", help="Address the metrics endpoint binds.")
    p.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: RAY_ADDRESS or local).")
    _add_common(p, "embed")


def _evaluate_parser(sub: Any) -> None:
    p = _subparser(sub, "evaluate",
                   help="Evaluate embeddings: probes, kNN, retrieval, ABMIL, survival, ranks (stage 4).",
                   description="Evaluate one or more models (one `gpfm-scale embed` output each) on downstream "
                               "tasks; writes DIR/results.json (metric -> value and 95% CI per model and task) "
                               "and DIR/report.md with figures. Several models are ranked per task.")
    p.add_argument("--features", action="append", metavar="DIR",
                   help="An embedding output directory (repeat for several models).")
    p.add_argument("--task", action="append",
                   help="linear-probe, knn, few-shot, retrieval, abmil or survival (repeat or comma-separate).")
    p.add_argument("--labels", help="CSV/Parquet keyed by slide_id|image|file|path with label / time, event / "
                                    "case_id columns; overrides the labels of the embedding index.")
    p.add_argument("--out", help="Report directory.")
    p.add_argument("--seed", type=int, dest="seed", help="Seed of splits, probes, few-shot draws and bootstrap.")
    p.add_argument("--bootstrap", type=int, dest="bootstrap", help="Bootstrap resamples for the CIs (0: none).")
    _add_common(p, "evaluate")


def _demo_parser(sub: Any) -> None:
    p = _subparser(sub, "demo", help="Run every stage end to end on small real and synthetic slides.")
    p.add_argument("--out", default="demo-output", help="Where the demo writes everything.")
    _add_log_level(p)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"cmd", "config", "set", "print_config", "log_level", "slides", "out", "shards", "resume", "features",
            "task", "labels", "argv", "model", "input"}
    over = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if over.get("grid.max_tiles_per_slide") == 0:
        over["grid.max_tiles_per_slide"] = None
    over.update(_parse_set(args.set))
    return over


def _run_tile(args: argparse.Namespace, cfg: Any) -> int:
    from gpfm_scale.tiling.stage import run

    result = run(cfg, args.slides, args.out)
    print(f"tiled {result.n_done}/{result.n_slides} slides, {result.n_tiles} tiles this run "
          f"({result.tiles_per_second:.0f} tiles/s) -> {result.out}")
    print(f"manifest: {result.manifest}")
    if result.absent:
        more = f" and {len(result.absent) - 20} more" if len(result.absent) > 20 else ""
        print(f"kept {len(result.absent)} slide(s) of earlier runs that are not in --slides (see the manifest's "
              f"in_input): {', '.join(result.absent[:20])}{more}")
    for sid, reason in result.no_tiles:
        print(f"NO TILES {sid}: {reason}", file=sys.stderr)
    for sid, reason in result.failed:
        print(f"FAILED {sid}: {reason}", file=sys.stderr)
    return 0 if result.ok else 1


def _run_pretrain(args: argparse.Namespace, cfg: Any) -> int:
    from gpfm_scale.train.stage import run

    result = run(cfg, args.out, shards=args.shards, resume=args.resume)
    print(f"pretrained {result.steps} steps in {result.seconds:.0f} s")
    print(f"  teacher:     {result.export_dir}")
    print(f"  checkpoint:  {result.checkpoint}")
    print(f"  metrics:     {result.out}/metrics.jsonl")
    return 0


def _run_mix(args: argparse.Namespace, cfg: Any) -> int:
    from gpfm_scale.data.mixing import run

    result = run(cfg, args.shards, args.out)
    print(f"mixed {result.n_samples} samples of {result.n_inputs} shards into {result.n_shards} shards "
          f"({result.samples_per_second:.0f} samples/s) -> {result.out}")
    for problem in result.problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    return 0 if result.ok else 1


def _run_embed(args: argparse.Namespace, cfg: Any) -> int:
    from gpfm_scale.embed_command import run

    result = run(cfg, args.model, args.input, args.out)
    print(f"embedded {result.n_done}/{result.n_items} with {result.model} -> {result.index}")
    for sid, reason in result.failed:
        print(f"FAILED {sid}: {reason}", file=sys.stderr)
    return 0 if result.ok else 1


def _run_evaluate(args: argparse.Namespace, cfg: Any) -> int:
    from gpfm_scale.evaluate.stage import run

    tasks = [t.strip() for item in args.task for t in item.split(",") if t.strip()]
    result = run(cfg, args.features, tasks, args.out, labels=args.labels,
                 command=shlex.join(["gpfm-scale", *args.argv]))
    print(f"report: {result.report_md}")
    print(f"results: {result.results_json}")
    return 0


def _run_demo(args: argparse.Namespace, cfg: Any) -> int:
    from gpfm_scale.demo import run_demo

    return run_demo(args.out)


def _load_stage_config(args: argparse.Namespace) -> StrictModel:
    """The sub-command's config: its model's defaults, then --config, then options and --set (one way for all)."""
    module, _, name = CONFIG_MODELS[args.cmd].partition(":")
    return load_config(getattr(importlib.import_module(module), name), args.config, _overrides(args))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpfm-scale")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _missing_inputs(args: argparse.Namespace) -> list[str]:
    """The run inputs of `args.cmd` not given (none are needed to --print-config)."""
    if getattr(args, "print_config", False):
        return []
    return [flag for flag in RUN_INPUTS.get(args.cmd, ()) if getattr(args, flag[2:].replace("-", "_")) is None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpfm-scale", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _tile_parser(sub)
    _mix_parser(sub)
    _pretrain_parser(sub)
    _embed_parser(sub)
    _evaluate_parser(sub)
    _demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = _missing_inputs(args)
    if missing:
        print(f"gpfm-scale {args.cmd}: error: the following arguments are required: {', '.join(missing)}",
              file=sys.stderr)
        return 2
    args.argv = argv
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"tile": _run_tile, "mix": _run_mix, "pretrain": _run_pretrain, "embed": _run_embed,
                "evaluate": _run_evaluate, "demo": _run_demo}
    try:
        cfg = _load_stage_config(args) if args.cmd in CONFIG_MODELS else None
        if cfg is not None and args.print_config:
            print(describe_config(cfg))
            return 0
        return handlers[args.cmd](args, cfg)
    except GpfmError as err:
        print(f"gpfm-scale {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
