"""Names from data never escape their directory (issue 10.2)."""

from __future__ import annotations

import os

import pytest

from gpfm_scale.errors import UnsafeNameError
from gpfm_scale.names import checked_component, child_path, safe_id


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "a\\b", "x\x00y", ".hidden", "x" * 201])
def test_checked_component_refuses(bad):
    with pytest.raises(UnsafeNameError):
        checked_component(bad)


def test_safe_id_maps_unsafe_characters_and_refuses_dot_names():
    assert safe_id("TCGA 01/A:B") == "TCGA_01_A_B"
    assert safe_id("slide-1.v2") == "slide-1.v2"
    for bad in (".", "..", ""):
        with pytest.raises(UnsafeNameError):
            safe_id(bad)


def test_child_path_stays_under_root(tmp_path):
    assert child_path(str(tmp_path), "a.h5") == os.path.join(str(tmp_path), "a.h5")
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(UnsafeNameError):
        child_path(str(tmp_path), "link", "passwd")
    with pytest.raises(UnsafeNameError):
        child_path(str(tmp_path), "..", "x")
