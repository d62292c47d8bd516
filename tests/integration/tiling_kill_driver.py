"""A tiling driver that SIGKILLs itself right after its Nth shard commit is durable.

`python -m tests.integration.tiling_kill_driver SLIDES OUT N SETTINGS_JSON`: the driver-kill test runs this as its
own process so that the kill lands at an exact commit (the stage's `on_commit` hook), not after a guessed delay.
Exits 1 if the run ends before its Nth commit.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from gpfm_scale.config import build_config
from gpfm_scale.tiling.config import TilingConfig
from gpfm_scale.contracts.shards import SealedShard
from gpfm_scale.tiling.stage import run


def main(slides: str, out: str, commits: int, settings: str) -> None:
    seen: list[str] = []

    def die_at_the_nth(sealed: SealedShard) -> None:
        seen.append(sealed.name)
        if len(seen) == commits:
            os.kill(os.getpid(), signal.SIGKILL)

    run(build_config(TilingConfig, json.loads(settings)), slides, out, on_commit=die_at_the_nth)
    sys.exit(f"the run ended after {len(seen)} commit(s), before commit {commits}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
