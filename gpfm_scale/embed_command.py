"""`gpfm-scale embed`: the embedding stage, with the tiling stage in front when the input is whole slides.

Stages do not import each other (they share only `gpfm_scale/contracts`), so the one command that runs two of them
is composed here, above both: its config is the embedding config plus a `tiling` section, and a slide input is
tiled into `OUT/tiles` by the tiling stage (inside the embedding run's output lock) before its tiles are embedded.
"""

from __future__ import annotations

import logging

from pydantic import Field

from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.stage import EmbedResult
from gpfm_scale.embed.stage import run as run_embedding
from gpfm_scale.tiling.config import TilingConfig

log = logging.getLogger(__name__)


class EmbedCommandConfig(EmbedConfig):
    tiling: TilingConfig = Field(
        default_factory=TilingConfig, description="Tiling settings used when the input is a slide manifest.")


def run(cfg: EmbedCommandConfig, model_spec: str, input_path: str, out: str) -> EmbedResult:
    """`embed.stage.run`, tiling a slide input first with `cfg.tiling` (on the embedding run's Ray cluster unless
    `tiling.ray_address` names another)."""

    def tile_slides(slides: str, tiles_dir: str) -> None:
        from gpfm_scale.tiling.stage import run as run_tiling

        tiling_cfg = cfg.tiling.model_copy(update={"ray_address": cfg.tiling.ray_address or cfg.ray_address})
        tiled = run_tiling(tiling_cfg, slides, tiles_dir)
        log.info("tiling: %d done, %d failed", tiled.n_done, tiled.n_failed)

    return run_embedding(cfg, model_spec, input_path, out, tile_slides=tile_slides)
