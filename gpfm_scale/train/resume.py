"""What `pretrain --out DIR [--resume]` must agree with in DIR before it trains, and the repair of metrics.jsonl.

`--resume` promises the losses of an uninterrupted run step for step. That holds only if every setting that
shapes the trajectory (model, losses, crops, masks, optimiser, schedules, data and its split over workers, seed,
precision, ZeRO stage, run length) is the one the run started with, so the run's `config.yaml` is the reference
and a resume may change only the keys of `NON_TRAJECTORY_KEYS`. It is an allow-list on purpose: a key added to
the config later is refused on resume until someone decides it cannot change the trajectory and lists it here.

`metrics.jsonl` gets one row per logged step. A run killed after its last checkpoint has rows past it, which the
resumed run computes again: `truncate_metrics` drops them so that each step appears once, with the values of the
run that carried on.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Iterator

from gpfm_scale.atomic import write_bytes_atomic
from gpfm_scale.config import build_config, dump_config, read_yaml
from gpfm_scale.errors import ConfigError
from gpfm_scale.train.pretrain_config import PretrainConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"

# Dotted keys a resumed run may change: when to log, checkpoint and stop, how hard to retry, where Ray is, and
# resources or queue depths that change speed, never values. Not here on purpose: loader.num_workers (the batch
# at a step depends on it), run.num_workers (the data split and the global batch), run.use_gpu and
# deepspeed.* (precision and reduction order), expert_placement.mode / dtype (where and in what dtype the
# experts compute their targets), run.name (it names the run being resumed).
NON_TRAJECTORY_KEYS = frozenset({
    "run.stop_after_steps", "run.checkpoint_every", "run.keep_checkpoints", "run.log_every", "run.max_failures",
    "run.ray_address", "run.cpus_per_worker",
    "loader.prefetch", "loader.decode_threads", "loader.max_consecutive_corrupt",
    "expert_placement.cpus_per_actor", "expert_placement.max_concurrency", "expert_placement.prefetch_depth",
    "expert_placement.ready_timeout_s",
})


def flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) of a nested mapping; lists are leaves (compared whole)."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def trajectory_changes(saved: PretrainConfig, new: PretrainConfig) -> list[str]:
    """'key: old -> new' for every key outside NON_TRAJECTORY_KEYS whose value differs, in config order."""
    old = dict(flatten(saved.model_dump(mode="json")))
    return [f"{key}: {old.get(key)!r} -> {value!r}" for key, value in flatten(new.model_dump(mode="json"))
            if key not in NON_TRAJECTORY_KEYS and old.get(key) != value]


def read_run_config(path: str) -> PretrainConfig:
    """The config a run in --out was started with; ConfigError when it is unreadable or another stage's."""
    try:
        data = read_yaml(path)
    except ConfigError as err:  # YAML's report spans lines: its first two say what and where
        what, *where = str(err).splitlines()
        raise ConfigError(f"cannot read the run's config: {what}{f' ({where[0].strip()})' if where else ''}") from None
    data = _drop_moved_copies(data, path)
    try:
        return build_config(PretrainConfig, data, path)
    except ConfigError as err:
        problems = str(err).splitlines()
        raise ConfigError(f"{path} is not a pretraining config ({problems[0]}{' ...' if len(problems) > 1 else ''})"
                          "; is --out another stage's output directory?") from None


def _drop_moved_copies(data: dict[str, Any], path: str) -> dict[str, Any]:
    """A config.yaml from before a value got one owner (`PretrainConfig.moved_keys`, e.g. loader.seed -> run.seed)
    holds both: the old key goes when it equals its owner (the trajectory is the same), else the run is refused."""
    data, flat = copy.deepcopy(data), dict(flatten(data))
    defaults = dict(flatten(PretrainConfig().model_dump(mode="json")))
    for old_key, owner in PretrainConfig.moved_keys.items():
        if old_key not in flat:
            continue
        value = flat.get(owner, defaults[owner])
        if flat[old_key] != value:
            raise ConfigError(f"{path}: {old_key} {flat[old_key]!r} != {owner} {value!r}; this version has one "
                              f"value for both ({owner}), so it cannot continue that run")
        *parents, leaf = old_key.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[leaf]
    return data


def check_out(out: str, cfg: PretrainConfig, resume: bool) -> None:
    """Refuse what would overwrite a run in `out` or resume it on another trajectory; one ConfigError each."""
    saved_path = os.path.join(out, CONFIG_NAME)
    run_dir = os.path.join(out, "checkpoints", cfg.run.name)
    saved = read_run_config(saved_path) if os.path.exists(saved_path) else None
    if not resume:
        if os.path.isdir(run_dir):
            raise ConfigError(f"{run_dir} exists: pass --resume to continue it, or use a new --out")
        if saved is not None and os.path.isdir(os.path.join(out, "checkpoints", saved.run.name)):
            raise ConfigError(f"{out} holds the run {saved.run.name!r}: pass --resume with its config to continue "
                              "it, or use a new --out")
        return
    if saved is None:
        if os.path.isdir(run_dir):
            raise ConfigError(f"cannot resume {run_dir}: {saved_path} is missing, so the settings it was started "
                              "with are unknown")
        log.warning("--resume given but %s has no run yet: starting from step 0", out)
        return
    changes = trajectory_changes(saved, cfg)
    if changes:
        raise ConfigError(f"--resume keeps the run's trajectory, but these differ from {saved_path}: "
                          f"{'; '.join(changes)}. Resume with the saved values or start a new --out "
                          f"(may change on resume: {', '.join(sorted(NON_TRAJECTORY_KEYS))})")
    if not os.path.isdir(run_dir):
        log.warning("--resume given but %s has no checkpoint yet: starting from step 0", run_dir)


def write_run_config(out: str, cfg: PretrainConfig) -> None:
    """config.yaml: the resolved config of the latest start (a resume differs only in NON_TRAJECTORY_KEYS)."""
    write_bytes_atomic(os.path.join(out, CONFIG_NAME), dump_config(cfg).encode())


def truncate_metrics(path: str, step: int) -> int:
    """Keep the rows of steps <= `step` (the checkpoint a run continues from; 0: none); returns rows dropped.

    A torn last line (a run killed mid-write) is dropped too. Rewritten whole, never edited in place."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", step + 1)) <= step:
            kept.append(line + b"\n")
    dropped = len(lines) - len(kept)
    if dropped:
        write_bytes_atomic(path, b"".join(kept))
        log.info("%s: dropped %d rows past step %d (the resumed run writes them again)", path, dropped, step)
    return dropped
