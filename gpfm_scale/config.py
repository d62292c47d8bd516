"""Typed configs: every default written once, in code; YAML files only state differences.

Each stage owns its config model (`gpfm_scale/<stage>/config.py`); they all derive from `StrictModel`, which
refuses unknown keys and names the offending key in the error. `load_config` reads a YAML file into one of them,
applies dotted `key=value` overrides, and wraps pydantic's report in a one-line-per-problem `ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpfm_scale.errors import ConfigError

M = TypeVar("M", bound="StrictModel")


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are validated on assignment too.

    `moved_keys` (on a root config): dotted keys it no longer has -> the key that now owns the value, so that an
    old YAML file or `--set` gets "'loader.seed' was removed: set 'run.seed'" instead of a bare unknown key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
    moved_keys: ClassVar[Mapping[str, str]] = {}


class DriverSettings(StrictModel):
    """Where a stage's driver finds Ray and serves its metrics (the stages whose driver counts their work)."""

    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Serve Prometheus metrics on this port while running.")
    metrics_host: str = Field(
        default="127.0.0.1", description="Address the metrics endpoint binds (0.0.0.0 or the head's IP on a cluster).")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join; default: RAY_ADDRESS, else a local instance.")
    resources_timeout_s: float = Field(
        default=1800.0, gt=0, description="Wait this long for the cluster to offer the stage's actors (an "
        "autoscaling cluster starts nodes on demand, GPU ones in 5-15 min), then fail (exit 2); see resources.py.")


def _format_errors(err: ValidationError, source: str, moved: Mapping[str, str]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden" and key in moved:
            lines.append(f"{source}: {key!r} was removed: set {moved[key]!r} (the one owner of that value)")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}")
        elif not e["loc"]:  # a check across keys of the whole config: its message names them, the input is all
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: invalid value for {key!r}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_config(model: type[M], data: Mapping[str, Any] | None, source: str = "config") -> M:
    """Validate a mapping into `model`, raising ConfigError that names each bad key."""
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, model.moved_keys)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`tissue.min_area_um2`) in a nested mapping; a None value sets the key to null."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[leaf] = value
    return out


def load_config(model: type[M], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> M:
    """Defaults of `model`, then the YAML file (if any), then overrides: the one way to make a config."""
    data = read_yaml(path) if path else {}
    source = str(path) if path else "config"
    return build_config(model, apply_overrides(data, overrides or {}), source)


def dump_config(cfg: StrictModel) -> str:
    """The resolved config as YAML, saved beside every run's outputs so a run can be repeated."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_config(cfg: StrictModel, indent: int = 0) -> str:
    """The resolved config as YAML with each field's description as a comment: the config reference users read."""
    lines = []
    pad = "  " * indent
    plain = cfg.model_dump(mode="json")
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, StrictModel):
            lines.append(f"{pad}{name}:")
            lines.append(describe_config(value, indent + 1))
        else:
            dumped = yaml.safe_dump({name: plain[name]}, default_flow_style=True, width=10**6).strip()
            lines.append(pad + dumped.removeprefix("{").removesuffix("}"))
    return "\n".join(lines)
