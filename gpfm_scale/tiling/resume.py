"""What a run does to an existing `--out` before tiling: check it is ours, then clear what a killed run left.

Called with the output lock held (`gpfm_scale.run_lock`), so no other run is writing there. What may be removed:
- temporary files of ours in `shards/.tmp` (`OutputDir.clear_tmp`): never committed, their slides are pending;
- a shard that no row names but whose name the driver reserved (`RunManifest.reserved`, journaled before any actor
  may publish under it): an actor publishes a sealed shard straight to its final name and the driver commits it by
  appending the journal record, so a driver or actor killed in between leaves such a shard, holding only slides
  never marked done, which are redone. Deleting it loses nothing the state claims, and keeping it would duplicate
  those slides' tiles once they are redone. Outputs of drivers older than the journal renamed a shard and then
  saved the manifest: their newest unnamed shard of the same run is such an orphan too.
  Anything else unnamed (no manifest at all, an unreserved older shard, another run name) cannot come from a
  crash; it is refused, never deleted.
A shard named by ANY row (done slides, slides absent from this run's input) is never touched.
"""

from __future__ import annotations

import logging

import yaml

from gpfm_scale.config import build_config
from gpfm_scale.contracts.output_dir import OutputDir
from gpfm_scale.contracts.shards import SHARD_RE
from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.tiling.manifest import RunManifest

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"


def check_layout(out: OutputDir, cfg: TilingConfig) -> None:
    """Refuse an output made by something else, or with settings that change the tile set."""
    if not out.exists(CONFIG_NAME):
        return
    where = out.path(CONFIG_NAME)
    try:
        data = yaml.safe_load(out.read_bytes(CONFIG_NAME))
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not YAML ({type(err).__name__}): not a tiling output; use a new --out") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is not a tiling config (a {type(data).__name__}, not a mapping); use a new --out")
    try:
        old = build_config(TilingConfig, data, where).layout_key()
    except ConfigError as err:
        raise ConfigError(f"{where} is not the config of a tiling run ({str(err).splitlines()[0]}); "
                          "use a new --out") from None
    new = cfg.layout_key()
    if old != new:
        diffs = [f"{k}: {old[k]} -> {new[k]}" for k in new if old.get(k) != new[k]]
        raise ConfigError(f"{out.url} was tiled with other settings ({'; '.join(diffs)}); use a new --out")


def _leftovers(out: OutputDir, shards: dict[str, int], manifest: RunManifest, had_manifest: bool,
               run_name: str) -> list[str]:
    """The unnamed shards a killed driver can have left (see the module docstring); raises on any other."""
    referenced = manifest.referenced_shards()
    unnamed = sorted(set(shards) - referenced)
    if not unnamed:
        return []
    if not had_manifest:
        raise ConfigError(f"{out.url}/shards holds {len(unnamed)} shard(s) but {out.url} has no run manifest: "
                          "they are not a tiling run's to delete; move them away or use a new --out")
    newest = max((shards[s] for s in referenced if s in shards), default=-1)
    foreign = [s for s in unnamed if not manifest.is_reserved(SHARD_RE.match(s).group("run"), shards[s])
               and (shards[s] < newest or SHARD_RE.match(s).group("run") != run_name)]
    if foreign:
        raise ConfigError(f"{out.url}/shards holds shard(s) that the run manifest does not list and that no "
                          f"interrupted run can have left: {foreign[:5]}; move them away or use a new --out")
    return unnamed


def reconcile(out: OutputDir, manifest: RunManifest, had_manifest: bool, run_name: str) -> int:
    """Clear what a killed run left behind; returns the next free shard index. Afterwards no reservation is
    outstanding (every reserved name is either referenced or gone), so they are dropped."""
    cleared = out.clear_tmp()
    if cleared:
        log.info("removed %d unfinished temporary file(s) of an interrupted run", cleared)
    shards = out.list_shards()
    for name in _leftovers(out, shards, manifest, had_manifest, run_name):
        log.warning("removing shard %s, published by an interrupted run before its slides were marked done; "
                    "they are still pending and will be redone", name)
        out.fs.rm(out.path("shards", name))
        del shards[name]
    missing = {s for s in manifest.referenced_shards() if s not in shards}
    lost = [sid for sid, r in manifest.rows.items() if set(r["shards"]) & missing]
    if lost:
        log.warning("%d done slide(s) lost their shard (deleted by hand?); they are pending again: %s",
                    len(lost), lost[:5])
        manifest.reset(lost)
    floor = max((hi for run, _lo, hi in manifest.reserved if run == run_name), default=0)
    manifest.reserved = []
    return max(max(shards.values(), default=-1) + 1, floor)  # never reuse a name an earlier actor may still hold


def sweep_orphans(out: OutputDir, manifest: RunManifest) -> int:
    """End of run: delete reserved shards no row names (published by an actor that died before its result came
    back, so its slides were redone elsewhere); returns how many. Unreserved unnamed shards are left alone."""
    referenced = manifest.referenced_shards()
    gone = 0
    for name, index in out.list_shards().items():
        if name not in referenced and manifest.is_reserved(SHARD_RE.match(name).group("run"), index):
            log.warning("removing shard %s, published by a lost tiling actor; its slides were redone", name)
            out.fs.rm(out.path("shards", name))
            gone += 1
    manifest.reserved = []
    return gone
