"""The embedding bar says what it waits for before the first result, then counts each block's images (13.6)."""

from __future__ import annotations

import pytest

from gpfm_scale.embed.progress import RUNNING, STARTING, EmbedProgress


def _screen(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip()]


def test_the_bar_shows_a_status_before_the_first_result_then_advances_per_block(
        capsys: pytest.CaptureFixture[str]) -> None:
    progress = EmbedProgress(total=10)
    before = _screen(capsys.readouterr().err)
    assert before and "starting inference actors" in before[-1] and "0/10" in before[-1]

    assert progress.advance(3, 1, "slides 0/2") > 0
    assert (progress.bar.n, progress.embedded, progress.bar.desc) == (4, 3, RUNNING)
    progress.advance(6, 0, "slides 2/2")
    progress.close()
    after = _screen(capsys.readouterr().err)
    assert "10/10" in after[-1] and "slides 2/2" in after[-1] and STARTING not in after[-1]
