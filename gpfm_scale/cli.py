"""`gpfm-scale`: one command, a sub-command per stage. This module only parses and dispatches.

The stages are one table, `STAGES`: each entry names the stage's config, its run function, its run inputs and how
its result is printed, and `main` does the same for all of them. A stage option either sets a config key (declared
with `_key`) or is a run input; `--set key=value` reaches any key not given its own option, and `--print-config`
shows the resolved config (all defaults included) without running anything.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from gpfm_scale.config import StrictModel, describe_config, load_config
from gpfm_scale.errors import GpfmError
from gpfm_scale.evaluate.tasks import tasks_help
from gpfm_scale.ray_utils import configure_logging

log = logging.getLogger("gpfm_scale")


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GpfmError(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


@dataclass(frozen=True)
class Stage:
    """A sub-command that runs a stage: its config, how its options reach its `run`, how its result is shown.

    `config` and `run` are "module:name", imported only when the sub-command runs or shows help (parsing stays
    light). Options that set a config key are `_ConfigOption`s; every other option is a run input, passed to
    `run(cfg, *inputs)` in the order of `inputs` (by dest; "command" is the command line itself).
    """

    config: str
    run: str
    parser: Callable[[Any], argparse.ArgumentParser]  # adds the sub-command and its own options
    inputs: tuple[str, ...]
    required: tuple[str, ...]  # flags a run needs; not needed for --print-config, so argparse does not require them
    summary: Callable[[Any], int]  # prints the result, returns the exit code
    workers: tuple[str, str] | None  # (config key, what it counts) that --workers sets
    set_example: str  # one real key=value of this config for the --set help (tests check it exists)


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def config_defaults(cmd: str) -> dict[str, Any]:
    """Dotted config key -> its default, from the sub-command's config model (the one place defaults are written)."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(_load(STAGES[cmd].config)().model_dump(mode="json"), "")
    return flat


class _ConfigOption(argparse.Action):
    """An option whose dest is a dotted config key: its value goes to `args.overrides`, so the config overrides are
    exactly the options of this kind that were given (nothing has to list the other options to leave them out).
    With `const` it takes no value and sets the key to `const`."""

    def __init__(self, option_strings: list[str], dest: str, const: Any = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=None if const is None else 0, const=const, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        value = values if self.const is None else self.const
        namespace.overrides = {**getattr(namespace, "overrides", {}), self.dest: value}


def _key(p: argparse.ArgumentParser, flag: str, key: str, **kwargs: Any) -> None:
    """Add `flag` as the option that sets config key `key`."""
    p.add_argument(flag, dest=key, action=_ConfigOption, **kwargs)


def _int_or_none(text: str) -> int | None:
    """A count where 0 means "no limit" (the config's null)."""
    try:
        return int(text) or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


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
        if default is None and self.cmd in STAGES:
            default = config_defaults(self.cmd).get(action.dest)
        if default is None or default is False or default == []:
            return text
        return f"{text} (default: {str(default).replace('%', '%%')})"


def _subparser(sub: Any, cmd: str, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(cmd, formatter_class=functools.partial(_DefaultsFormatter, cmd=cmd), **kwargs)


def _add_ray_address(p: argparse.ArgumentParser, key: str) -> None:
    """`--ray-address`, setting the stage's `key` (pretraining keeps it under `run.`)."""
    _key(p, "--ray-address", key, help="Ray cluster address (default: RAY_ADDRESS or local).")


def _add_metrics_endpoint(p: argparse.ArgumentParser) -> None:
    """`--metrics-port` / `--metrics-host` of the stages whose driver serves Prometheus metrics itself."""
    _key(p, "--metrics-port", "metrics_port", type=int,
         help="Serve Prometheus metrics on PORT while running (127.0.0.1 unless --metrics-host).")
    _key(p, "--metrics-host", "metrics_host", help="Address the metrics endpoint binds.")


def _add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Logging level.")


def _add_common(p: argparse.ArgumentParser, cmd: str) -> None:
    """The options every stage has: --workers (where the stage has workers), --config, --set, --print-config."""
    workers = STAGES[cmd].workers
    if workers is not None:
        _key(p, "--workers", workers[0], type=int, metavar="N", help=f"Sets {workers[0]}: {workers[1]}.")
    p.add_argument("--config", help="YAML file with config keys that differ from the defaults.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"Override any config key, dotted for nesting (e.g. --set {STAGES[cmd].set_example}). "
                        "Repeatable.")
    p.add_argument("--print-config", action="store_true",
                   help="Print the resolved config (every key, its value and what it means) as YAML and exit.")
    _add_log_level(p)


def _tile_parser(sub: Any) -> argparse.ArgumentParser:
    p = _subparser(sub, "tile", help="Cut whole-slide images into WebDataset shards (stage 1).",
                   description="Tile slides into DIR/shards/*.tar, DIR/coords/*.h5 (TRIDENT layout), "
                               "DIR/patches/*.h5 (CLAM layout), DIR/thumbnails/*.png and DIR/manifest.parquet. "
                               "Rerunning the same command resumes: finished slides are skipped, interrupted ones "
                               "redone, failed ones retried only with --retry-failed.")
    p.add_argument("--slides",
                   help="Slide manifest (CSV/Parquet with slide_id, path[, mpp, clinical columns]; an mpp column "
                        "overrides the slide's own), a folder, or a glob. Local paths or fsspec URLs (s3://, gs://).")
    p.add_argument("--out", help="Output directory (local path or fsspec URL).")
    _key(p, "--target-mpp", "grid.target_mpp", type=float,
         help="µm/px of the written tiles (resampled from the nearest finer level); omit for GPFM's native level-0 "
              "tiles.")
    _key(p, "--target-magnification", "grid.target_magnification", type=float,
         help="Alternative to --target-mpp: objective power of the written tiles (20 = 0.5 µm/px).")
    _key(p, "--tile-px", "grid.tile_px", type=int, help="Tile side in output pixels.")
    _key(p, "--stride-px", "grid.stride_px", type=int, help="Grid step in output pixels (default: tile).")
    _key(p, "--min-tissue", "grid.min_tissue_fraction", type=float, help="Minimum tissue fraction of a kept tile "
                                                                          "(0..1).")
    _key(p, "--max-tiles", "grid.max_tiles_per_slide", type=_int_or_none,
         help="Cap per slide, sampled with a fixed seed (GPFM: 2000). 0 means no cap.")
    _key(p, "--retry-failed", "retry_failed", const=True,
         help="Retry slides that failed in an earlier run into the same --out.")
    _add_metrics_endpoint(p)
    _add_ray_address(p, "ray_address")
    return p


def _pretrain_parser(sub: Any) -> argparse.ArgumentParser:
    p = _subparser(sub, "pretrain", help="Train the GPFM student/teacher with Ray Train + DeepSpeed (stage 2).",
                   description="Pretrain on the tiler's shards. Writes DIR/checkpoints/ (resume with --resume), "
                               "DIR/export/model.safetensors + config.json (the teacher, loadable with plain timm) "
                               "and DIR/metrics.jsonl. Configs: gpfm_scale/configs/tiny.yaml (CPU, minutes), "
                               "gpfm_scale/configs/vitl14_gpfm.yaml (the GPFM recipe).")
    p.add_argument("--shards", help="Tiler output dir, shards dir, glob or comma-separated shard URLs "
                                    "(default: loader.shards of the config).")
    p.add_argument("--out", default="pretrain-output", help="Output directory (shared by all nodes).")
    p.add_argument("--resume", action="store_true", help="Continue the run in --out from its newest checkpoint.")
    _key(p, "--steps", "run.total_iters", type=int, help="Total optimiser steps.")
    _key(p, "--zero-stage", "deepspeed.zero_stage", type=int, choices=[0, 1, 2, 3], help="ZeRO stage.")
    _add_ray_address(p, "run.ray_address")
    return p


def _mix_parser(sub: Any) -> argparse.ArgumentParser:
    p = _subparser(sub, "mix", help="Rewrite the tiler's shards into cohort-mixed training shards (before pretrain).",
                   description="Shuffle every tile of the input shards across DIR/shards/{run_name}-NNNNNN.tar "
                               "(each a uniform random sample of the cohort, in random order) with Ray Data, so "
                               "that training batches mix slides; writes DIR/mix.json last.")
    p.add_argument("--shards", help="Tiler output dir, shards dir, glob or brace notation.")
    p.add_argument("--out", help="Output directory (local path or fsspec URL).")
    _key(p, "--seed", "seed", type=int, help="Seed of the mix.")
    _key(p, "--shard-bytes", "shard_bytes", type=int, help="Target bytes per output shard.")
    _add_ray_address(p, "ray_address")
    return p


def _embed_parser(sub: Any) -> argparse.ArgumentParser:
    p = _subparser(sub, "embed", help="Embed tiles of a cohort (or labelled patches) with a model (stage 3).",
                   description="Map a model over the tiler's shards, a slide manifest (tiled first into "
                               "DIR/tiles/) or an image folder (class/image.png) with Ray Data. Writes "
                               "DIR/features/{slide_id}.h5 (features + coords, CLAM/TRIDENT layout), "
                               "DIR/index.parquet and DIR/failed.parquet. Rerunning resumes.")
    p.add_argument("--model",
                   help="An export directory of `gpfm-scale pretrain`, expert:NAME, or timm:NAME (local weights).")
    p.add_argument("--input", help="Tiler output / shards, a slide manifest, or an image folder.")
    p.add_argument("--out", help="Output directory.")
    _key(p, "--batch-size", "batch_size", type=int, help="Images per forward pass.")
    _add_metrics_endpoint(p)
    _add_ray_address(p, "ray_address")
    return p


def _evaluate_parser(sub: Any) -> argparse.ArgumentParser:
    p = _subparser(sub, "evaluate",
                   help="Evaluate embeddings: probes, kNN, retrieval, ABMIL, survival, ranks (stage 4).",
                   description="Evaluate one or more models (one `gpfm-scale embed` output each) on downstream "
                               "tasks; writes DIR/results.json (metric -> value and 95% CI per model and task) "
                               "and DIR/report.md with figures. Several models are ranked per task.")
    p.add_argument("--features", action="append", metavar="DIR",
                   help="An embedding output directory (repeat for several models).")
    p.add_argument("--task", action="extend", type=_task_list,
                   help=f"Task to run: {tasks_help()} (repeat or comma-separate).")
    p.add_argument("--labels", help="CSV/Parquet keyed by slide_id|image|file|path with label / time, event / "
                                    "case_id columns; overrides the labels of the embedding index.")
    p.add_argument("--out", help="Report directory.")
    _key(p, "--seed", "seed", type=int, help="Seed of splits, probes, few-shot draws and bootstrap.")
    _key(p, "--bootstrap", "bootstrap", type=int, help="Bootstrap resamples for the CIs (0: none).")
    return p


def _demo_parser(sub: Any) -> None:
    p = _subparser(sub, "demo", help="Run every stage end to end on small real and synthetic slides.")
    p.add_argument("--out", default="demo-output", help="Where the demo writes everything.")
    _add_log_level(p)


def _tile_summary(result: Any) -> int:
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


def _pretrain_summary(result: Any) -> int:
    print(f"pretrained {result.steps} steps in {result.seconds:.0f} s")
    print(f"  teacher:     {result.export_dir}")
    print(f"  checkpoint:  {result.checkpoint}")
    print(f"  metrics:     {result.out}/metrics.jsonl")
    return 0


def _mix_summary(result: Any) -> int:
    print(f"mixed {result.n_samples} samples of {result.n_inputs} shards into {result.n_shards} shards "
          f"({result.samples_per_second:.0f} samples/s) -> {result.out}")
    for problem in result.problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    return 0 if result.ok else 1


def _embed_summary(result: Any) -> int:
    print(f"embedded {result.n_done}/{result.n_items} with {result.model} -> {result.index}")
    for sid, reason in result.failed:
        print(f"FAILED {sid}: {reason}", file=sys.stderr)
    return 0 if result.ok else 1


def _evaluate_summary(result: Any) -> int:
    print(f"report: {result.report_md}")
    print(f"results: {result.results_json}")
    return 0


STAGES = {
    "tile": Stage("gpfm_scale.tiling.config:TilingConfig", "gpfm_scale.tiling.stage:run", _tile_parser,
                  inputs=("slides", "out"), required=("--slides", "--out"), summary=_tile_summary,
                  workers=("workers", "tiling actors (default: cluster CPUs)"), set_example="tissue.close_px=9"),
    "mix": Stage("gpfm_scale.data.mixing:MixConfig", "gpfm_scale.data.mixing:run", _mix_parser,
                 inputs=("shards", "out"), required=("--shards", "--out"), summary=_mix_summary, workers=None,
                 set_example="shard_bytes=500000000"),
    "pretrain": Stage("gpfm_scale.train.pretrain_config:PretrainConfig", "gpfm_scale.train.stage:run",
                      _pretrain_parser, inputs=("out", "shards", "resume"), required=(), summary=_pretrain_summary,
                      workers=("run.num_workers", "Ray Train workers"), set_example="optim.clip_grad=3.0"),
    "embed": Stage("gpfm_scale.embed_command:EmbedCommandConfig", "gpfm_scale.embed_command:run", _embed_parser,
                   inputs=("model", "input", "out"), required=("--model", "--input", "--out"),
                   summary=_embed_summary, workers=("num_actors", "inference actors (usually one per GPU)"),
                   set_example="feature_dtype=float16"),
    "evaluate": Stage("gpfm_scale.evaluate.config:EvaluateConfig", "gpfm_scale.evaluate.stage:run",
                      _evaluate_parser, inputs=("features", "task", "out", "labels", "command"),
                      required=("--features", "--task", "--out"), summary=_evaluate_summary, workers=None,
                      set_example="knn.k=20"),
}


def _load_stage_config(args: argparse.Namespace) -> StrictModel:
    """The sub-command's config: its model's defaults, then --config, then options and --set (one way for all)."""
    overrides = {**getattr(args, "overrides", {}), **_parse_set(args.set)}
    return load_config(_load(STAGES[args.cmd].config), args.config, overrides)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpfm-scale")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _missing_inputs(args: argparse.Namespace) -> list[str]:
    """The run inputs of `args.cmd` not given (none are needed to --print-config)."""
    if args.cmd not in STAGES or args.print_config:
        return []
    return [flag for flag in STAGES[args.cmd].required if getattr(args, flag[2:].replace("-", "_")) is None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpfm-scale", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in STAGES:
        _add_common(STAGES[cmd].parser(sub), cmd)
    _demo_parser(sub)
    return parser


def _run_stage(args: argparse.Namespace) -> int:
    if args.cmd == "demo":
        from gpfm_scale.demo import run_demo

        return run_demo(args.out)
    stage = STAGES[args.cmd]
    cfg = _load_stage_config(args)
    if args.print_config:
        print(describe_config(cfg))
        return 0
    return stage.summary(_load(stage.run)(cfg, *(getattr(args, name) for name in stage.inputs)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    missing = _missing_inputs(args)
    if missing:
        print(f"gpfm-scale {args.cmd}: error: the following arguments are required: {', '.join(missing)}",
              file=sys.stderr)
        return 2
    args.command = shlex.join(["gpfm-scale", *argv])
    configure_logging(args.log_level)
    try:
        return _run_stage(args)
    except GpfmError as err:
        print(f"gpfm-scale {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
