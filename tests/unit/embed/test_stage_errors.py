"""The reason a failed Ray pipeline reports: the original error inside Ray's wrappers."""

from __future__ import annotations

from gpfm_scale.embed.stage import root_cause


def test_root_cause_finds_the_original_error_line_in_a_wrapped_failure():
    inner = RuntimeError("")
    outer = RuntimeError("The actor died because of an error raised in its creation task\n  File x.py, line 3\n"
                         "gpfm_scale.errors.CheckpointMismatchError: uni: weights do not match the model")
    outer.__cause__ = inner
    assert root_cause(outer) == "CheckpointMismatchError: uni: weights do not match the model"


def test_root_cause_falls_back_to_the_first_line():
    assert root_cause(ValueError("bad input\nmore")) == "ValueError: bad input"
    assert root_cause(KeyError()) == "KeyError: "
