"""A Ray Train callback that kills a training worker at an exact point of the run, for the recovery test.

Defined here, not in the test module: Ray unpickles it on the controller by its module's name, which must be
importable there (pytest imports test modules under their bare file name).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import ray
from ray.train import UserCallback


class KillAWorkerAtTheFirstCheckpoint(UserCallback):
    """Runs on Ray Train's controller: when the controller has registered the run's first checkpoint (the one a
    restart would resume from), SIGKILLs one training worker of this run, once. Notes each registered checkpoint,
    the kill and the failures the controller then sees, in order, as JSON lines in `events` (the test reads them)."""

    def __init__(self, events: str) -> None:
        self.events, self.killed = events, False

    def _note(self, **event: Any) -> None:
        with open(self.events, "a") as f:
            f.write(json.dumps(event) + "\n")

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        self._note(checkpoint=metrics[0]["step"], resumed_from=metrics[0]["resumed_from"])
        if not self.killed:
            self.killed = True
            pid = a_worker_of_this_run()
            os.kill(pid, signal.SIGKILL)
            self._note(killed=pid)

    def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
        self._note(failed=sorted(worker_exceptions))


def a_worker_of_this_run(num_workers: int = 2) -> int:
    """The pid of a training worker of the running job, from Ray's state API: actors of this test session's own
    Ray cluster, not every process on the machine (another Ray session's workers are left alone; its address is
    given: with none, the state API refuses when several Ray instances run on the machine). The session runs one
    training run at a time, so its job's alive training workers are this run's."""
    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    workers = list_actors(address=context.gcs_address, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", context.get_job_id())])
    assert len(workers) == num_workers, f"expected this run's {num_workers} training workers, found {workers}"
    return int(workers[-1].pid)
