"""The import graph of gpfm_scale.data (grimp, function-level imports included): no cycle, and the two loader
backends independent of each other (`loader.py` above them picks one)."""

from __future__ import annotations

import grimp
import pytest

DATA = "gpfm_scale.data"
BACKENDS = ("gpfm_scale.data.shard_stream", "gpfm_scale.data.dali_pipeline")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("gpfm_scale")


def test_no_import_cycle_through_data(graph):
    """Every direct import of a data module must have no way back to it (through any gpfm_scale module)."""
    cycles = []
    for module in sorted(graph.find_descendants(DATA) | {DATA}):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append((module, *back))
    assert not cycles, f"import cycles: {cycles}"


def test_backends_do_not_import_each_other(graph):
    first, second = BACKENDS
    assert graph.find_shortest_chain(importer=first, imported=second) is None
    assert graph.find_shortest_chain(importer=second, imported=first) is None
    assert set(BACKENDS) <= graph.find_modules_directly_imported_by("gpfm_scale.data.loader")
