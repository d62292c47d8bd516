"""`gpfm-scale embed`: the embedding stage, with the tiling stage in front when the input is whole slides.

Stages do not import each other (they share only `gpfm_scale/contracts`), so the one command that runs two of them
is composed here, above both: its config is the embedding config plus a `tiling` section, and a slide input is
tiled into `OUT/tiles` by the tiling stage (inside the embedding run's output lock) before its tiles are embedded.
The driver settings (Ray address, resource wait) are the embedding run's, once; the tiling runs under them.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Mapping

from pydantic import Field

from gpfm_scale.config import DriverSettings
from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.stage import EmbedResult
from gpfm_scale.embed.stage import run as run_embedding
from gpfm_scale.tiling.config import TilingConfig, TilingSettings

log = logging.getLogger(__name__)


class EmbedCommandConfig(EmbedConfig):
    moved_keys: ClassVar[Mapping[str, str]] = {f"tiling.{key}": key for key in DriverSettings.model_fields}

    tiling: TilingSettings = Field(
        default_factory=TilingSettings, description="Tiling settings used when the input is a slide manifest.")

    def tiling_config(self) -> TilingConfig:
        """The tiling of a slide manifest: `tiling`, on this run's Ray cluster and resource wait. No metrics port
        of its own: this run's endpoint serves the tiling counters too (one registry per process)."""
        return TilingConfig(**self.tiling.model_dump(), ray_address=self.ray_address,
                            resources_timeout_s=self.resources_timeout_s)


def run(cfg: EmbedCommandConfig, model_spec: str, input_path: str, out: str) -> EmbedResult:
    """`embed.stage.run`, tiling a slide input first into `OUT/tiles` with `cfg.tiling_config()`."""

    def tile_slides(slides: str, tiles_dir: str) -> None:
        from gpfm_scale.tiling.stage import run as run_tiling

        tiled = run_tiling(cfg.tiling_config(), slides, tiles_dir)
        log.info("tiling: %d done, %d failed", tiled.n_done, tiled.n_failed)

    return run_embedding(cfg, model_spec, input_path, out, tile_slides=tile_slides)
