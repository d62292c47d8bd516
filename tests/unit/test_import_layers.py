"""The stages share data only through `gpfm_scale/contracts` (issue 11.3): no stage package imports another (not
even through a third package), `data/` does not import the tiling stage, and `contracts/` builds on the base
modules alone. Read from the real import graph (grimp: every import, function-level ones included)."""

from __future__ import annotations

import grimp
import pytest

STAGES = ("tiling", "train", "embed", "evaluate")
BASE = {"gpfm_scale.config", "gpfm_scale.errors", "gpfm_scale.names", "gpfm_scale.atomic"}
FORBIDDEN = [(a, b) for a in STAGES for b in STAGES if a != b] + [("data", "tiling")]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("gpfm_scale")


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN, ids=[f"{a}-{b}" for a, b in FORBIDDEN])
def test_a_stage_does_not_import_another_stage(graph, importer, imported):
    chains = graph.find_shortest_chains(importer=f"gpfm_scale.{importer}", imported=f"gpfm_scale.{imported}")
    assert not chains, f"{importer} imports {imported}: {sorted(' -> '.join(c) for c in chains)}"


def test_contracts_import_only_base_modules(graph):
    outside = {(module, imported) for module in graph.find_descendants("gpfm_scale.contracts")
               for imported in graph.find_modules_directly_imported_by(module)
               if imported.startswith("gpfm_scale.") and not imported.startswith("gpfm_scale.contracts")
               and imported not in BASE}
    assert not outside, sorted(outside)
