"""Write cluster/grafana/gpfm-dashboard.json from the metric catalogue (`gpfm_scale.metrics.definitions.CATALOGUE`).

Why generated: the dashboard must have a panel for every metric the code defines and query no name it does not.
Deriving the panels from the catalogue keeps that true when a metric is added: rerun this script and commit the
JSON (tests/unit/test_cluster_configs.py fails, naming the metric, until then). Run from the repository root:

    .venv/bin/python cluster/grafana/build_dashboard.py

One row per stage (metric prefix `gpfm_tiling_`, `gpfm_pretrain_`, `gpfm_embed_`), one panel per metric, plus a
"Ray cluster" row for other gpfm metrics and a few of Ray's own system metrics (object-store spilling, GPU use).
Query rules: counters are exposed as `<name>_total` and shown as `sum by (labels) (rate(<name>_total[1m]))`, plus
a stat panel of totals when they have labels (e.g. slides by status); gauges as `max by (labels) (<name>)`, one
series per label value (loss by `term`, step time by `rank`). Names are the ones Prometheus stores, whichever
process recorded them: cluster/prometheus/prometheus.yml strips the `ray_` prefix Ray gives metrics recorded in
Ray workers.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

OUT = Path(__file__).with_name("gpfm-dashboard.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE_WINDOW = "1m"
STAGE_ROWS = (("tiling", "Tiling"), ("pretrain", "Pretraining"), ("embed", "Embedding"))
CLUSTER_ROW = "Ray cluster"


class Metric(Protocol):
    """What the dashboard needs of a catalogue entry (`gpfm_scale.metrics.definitions.MetricSpec`)."""

    name: str  # without the `_total` Prometheus adds to counters
    kind: str  # "counter" or "gauge"
    help: str
    labels: tuple[str, ...]


def stage_of(m: Metric) -> str:
    """The stage word after `gpfm_` when it names a stage row (tiling, pretrain, embed), else ""."""
    parts = m.name.split("_")
    return parts[1] if len(parts) > 1 and parts[1] in dict(STAGE_ROWS) else ""


@dataclass
class Panel:
    """A Grafana panel before layout: targets are (PromQL, legend) pairs."""

    title: str
    description: str
    unit: str
    targets: list[tuple[str, str]]
    kind: str = "timeseries"
    width: int = 12


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def _title(m: Metric, suffix: str = "") -> str:
    """`gpfm_tiling_tiles_written`, " per second" -> "Tiles written per second"; labels appended as "by ..."."""
    words = m.name.split("_")[2:] if stage_of(m) else m.name.split("_")[1:]
    text = (" ".join(words).capitalize() or m.name) + suffix
    return text + (f" by {', '.join(m.labels)}" if m.labels else "")


def _unit(m: Metric, rate: bool) -> str:
    if m.name.endswith("_seconds"):
        return "s"
    if m.name.endswith("_bytes"):
        return "Bps" if rate else "bytes"
    if m.name.endswith("_ratio"):
        return "percentunit"
    return "short"


def _agg(op: str, labels: tuple[str, ...], inner: str) -> str:
    """`sum by (status) (inner)`, or `sum(inner)` without labels."""
    return f"{op} by ({', '.join(labels)}) ({inner})" if labels else f"{op}({inner})"


def _legend(m: Metric, default: str) -> str:
    return " ".join(f"{{{{{label}}}}}" for label in m.labels) or default


def metric_panels(m: Metric) -> list[Panel]:
    """The panels of one metric, by its kind (rules in the module docstring)."""
    legend = _legend(m, m.name)
    if m.kind == "counter":
        total = f"{m.name}_total"
        panels = [Panel(_title(m, f" per second ({RATE_WINDOW} rate)"), m.help, _unit(m, rate=True),
                        [(_agg("sum", m.labels, f"rate({total}[{RATE_WINDOW}])"), legend)])]
        if m.labels:
            panels.append(Panel(_title(m, " (total)"), m.help, _unit(m, rate=False),
                                [(_agg("sum", m.labels, total), legend)], kind="stat"))
        return panels
    if m.kind == "gauge":
        return [Panel(_title(m), m.help, _unit(m, rate=False), [(_agg("max", m.labels, m.name), legend)])]
    raise ValueError(f"{m.name}: no panel rule for metric kind {m.kind!r}")


def ray_system_panels() -> list[Panel]:
    """Ray's own metrics worth watching next to ours (names as Ray exports them; see docs/cluster.md)."""
    return [
        Panel("Object store memory spilled to disk, by node",
              "Ray object-store bytes spilled to disk (ray_object_store_memory, Location=SPILLED). Sustained "
              "spilling slows every stage; docs/scaling.md sizes the store.", "bytes",
              [('sum by (instance) (ray_object_store_memory{Location="SPILLED"})', "{{instance}}")]),
        Panel("Object store memory by location",
              "Ray object-store bytes by location (MMAP_SHM, MMAP_DISK, SPILLED, WORKER_HEAP).", "bytes",
              [("sum by (Location) (ray_object_store_memory)", "{{Location}}")]),
        Panel("GPU utilization, mean per node",
              "Ray's GPU utilization (percent per GPU), averaged over each node's GPUs. Training nodes well "
              "below 100 with a high data or expert wait point at the input pipeline or the expert GPUs.",
              "percent", [("avg by (instance) (ray_node_gpus_utilization)", "{{instance}}")]),
    ]


def build_rows(metrics: Sequence[Metric]) -> list[Row]:
    """One row per stage with the panels of its metrics, then the cluster row (other gpfm metrics + Ray's)."""
    rows = {stage: Row(title) for stage, title in STAGE_ROWS}
    cluster = Row(CLUSTER_ROW)
    for m in metrics:
        rows.get(stage_of(m), cluster).panels.extend(metric_panels(m))
    cluster.panels.extend(ray_system_panels())
    return [*rows.values(), cluster]


def _panel_json(p: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
               for i, (expr, legend) in enumerate(p.targets)]
    options: dict[str, Any]
    if p.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "none", "textMode": "value_and_name"}
    else:
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
    return {"id": panel_id, "type": p.kind, "title": p.title, "description": p.description,
            "datasource": DATASOURCE, "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []}, "options": options,
            "targets": targets}


def layout(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows top to bottom, each followed by its panels two per line (Grafana's 24-column grid)."""
    out: list[dict[str, Any]] = []
    y, panel_id = 0, 1
    for row in rows:
        out.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        panel_id, y, x = panel_id + 1, y + 1, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y = 0, y + 8
            out.append(_panel_json(p, panel_id, x, y))
            panel_id, x = panel_id + 1, x + p.width
        y += 8 if row.panels else 0
    return out


def build_dashboard(metrics: Sequence[Metric]) -> dict[str, Any]:
    """The whole dashboard (Grafana schemaVersion 39) with a Prometheus datasource variable."""
    datasource_var = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                      "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False,
                      "multi": False}
    return {
        "title": "gpfm-scale", "uid": "gpfm-scale", "description": "Throughput, stalls and failures of every "
        "gpfm-scale stage (generated by cluster/grafana/build_dashboard.py).",
        "tags": ["gpfm-scale", "ray"], "timezone": "", "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "timepicker": {}, "annotations": {"list": []}, "links": [],
        "templating": {"list": [datasource_var]},
        "panels": layout(build_rows(metrics)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"Output JSON (default {OUT}).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from gpfm_scale.metrics.definitions import CATALOGUE

    dashboard = build_dashboard(CATALOGUE)
    args.out.write_text(json.dumps(dashboard, indent=2) + "\n")
    n_panels = sum(p["type"] != "row" for p in dashboard["panels"])
    log.info("wrote %s: %d panels", args.out, n_panels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
