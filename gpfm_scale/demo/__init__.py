"""`gpfm-scale demo`: every stage end to end on a local Ray instance, with a report comparing three models.

tile -> pretrain -> embed -> evaluate, on a few synthetic slides with known tissue classes plus the real CMU-1 SVS:
the tiled shards train a tiny GPFM student/teacher for a few dozen steps (Ray Train + DeepSpeed, tiny experts),
then the trained teacher, its own random initialisation and the tiny expert `tiny_a` embed labelled patches
(synthetic tissue tiles, real hgsc-nuclei crops) that linear probes and kNN classify. `OUT/report.md` links
every output. Modules: `config` (DemoConfig), `data` (slides, labelled patch folders), `stages` (calls to the
stage entry points), `run` (run_demo, reruns), `report` / `report_text` (the report).
"""

from gpfm_scale.demo.config import DemoConfig
from gpfm_scale.demo.run import run_demo

__all__ = ["DemoConfig", "run_demo"]
