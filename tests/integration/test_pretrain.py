"""Distributed pretraining on a local Ray instance: 2 workers, DeepSpeed ZeRO-2, tiny ViT, tiny experts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpfm_scale.errors import ConfigError
from gpfm_scale.metrics import CATALOGUE
from gpfm_scale.contracts.export import load_exported
from gpfm_scale.train.stage import run
from tests.integration.pretrain_helpers import read_metrics, tiny_config, write_tile_shards
from tests.integration.scrape_helpers import ray_agent_url, value, wait_for
from tests.integration.train_faults import KillAWorkerAtTheFirstCheckpoint

pytestmark = pytest.mark.usefixtures("ray_session")

LOSS_TERMS = ["dino_global", "dino_local", "ibot", "koleo", "expert/tiny_a/cls", "expert/tiny_a/patch",
              "expert/tiny_b/cls"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tile_shards(tmp_path_factory.mktemp("shards"))


def test_remote_experts_losses_fall_and_teacher_exports(shards, tmp_path):
    cfg = tiny_config(**{"run.total_iters": 30, "run.checkpoint_every": 30, "expert_placement.mode": "remote",
                         "expert_placement.accelerator_resource": "test_gpu", "expert_placement.cpus_per_actor": 0.5,
                         "expert_placement.expert_gpus_per_node": 2})
    result = run(cfg, str(tmp_path), shards=str(shards))
    assert result.steps == 30
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[:5], rows[-5:]
    for term in LOSS_TERMS[4:] + ["total"]:
        assert all(np.isfinite(r[term]) for r in rows)
        assert np.mean([r[term] for r in last]) < np.mean([r[term] for r in first]), term
    assert all(r["expert_wait_s"] >= 0 and r["images_per_s"] > 0 for r in rows)
    _check_agent_metrics(rows[-1])
    model, config = load_exported(result.export_dir)
    assert config["step"] == 30 and config["num_features"] == 64
    features = model.forward_features(torch.rand(2, 3, 32, 32))[:, 0]
    assert features.shape == (2, 64) and torch.isfinite(features).all()


def _check_agent_metrics(last: dict) -> None:
    """Every pretraining metric of the catalogue reaches Ray's metrics agent with the run's last values."""
    specs = [s for s in CATALOGUE if s.recorded_in == "ray_worker" and s.kind == "gauge"]
    samples = wait_for(ray_agent_url(), [f"ray_{s.exposed_name}" for s in specs])
    assert value(samples, "ray_gpfm_pretrain_step") == 30
    assert value(samples, "ray_gpfm_pretrain_loss", term="total") == pytest.approx(last["total"], rel=1e-5)
    assert value(samples, "ray_gpfm_pretrain_learning_rate") == pytest.approx(last["lr"], rel=1e-5)
    assert value(samples, "ray_gpfm_pretrain_teacher_momentum") == pytest.approx(last["momentum"], rel=1e-6)
    for rank in ("0", "1"):
        assert value(samples, "ray_gpfm_pretrain_step_seconds", rank=rank) > 0
        assert value(samples, "ray_gpfm_pretrain_worker_images_per_second", rank=rank) > 0
        assert value(samples, "ray_gpfm_pretrain_data_wait_seconds", rank=rank) >= 0
        assert value(samples, "ray_gpfm_pretrain_expert_wait_seconds", rank=rank) >= 0
    assert value(samples, "ray_gpfm_pretrain_images_per_second") > 0
    assert "ray_gpfm_pretrain_corrupt_samples_total" not in samples  # clean shards: nothing skipped, nothing counted


def _leave_rows_past_the_checkpoint(out, steps: list[int]) -> None:
    """What a run killed after its last checkpoint leaves: rows of later steps, the last one torn."""
    with open(out / "metrics.jsonl", "a") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "total": -1.0, "resumed_from": 0}) + "\n")
        f.write('{"step": %d, "to' % (steps[-1] + 1))


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(shards, tmp_path):
    base = {"run.total_iters": 12, "run.checkpoint_every": 6}
    run(tiny_config(**base), str(tmp_path / "full"), shards=str(shards))
    run(tiny_config(**base, **{"run.stop_after_steps": 6}), str(tmp_path / "split"), shards=str(shards))
    assert not (tmp_path / "split" / "export").exists()
    with pytest.raises(ConfigError, match=r"run\.seed: 0 -> 1"):  # another trajectory: refused before training
        run(tiny_config(**base, **{"run.seed": 1}), str(tmp_path / "split"), shards=str(shards), resume=True)
    _leave_rows_past_the_checkpoint(tmp_path / "split", [7, 8])
    run(tiny_config(**base, **{"run.log_every": 2}), str(tmp_path / "split"), shards=str(shards), resume=True)
    full, split = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 7)) + [8, 10, 12]  # each step once: log_every may change
    assert [r["resumed_from"] for r in split] == [0] * 6 + [6] * 3
    for b in split:
        a = full[b["step"] - 1]
        for term in LOSS_TERMS + ["total"]:
            assert a[term] == pytest.approx(b[term], rel=1e-4, abs=1e-5), (a["step"], term)
    with pytest.raises(ConfigError, match="--resume"):
        run(tiny_config(**base), str(tmp_path / "full"), shards=str(shards))


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_worker_is_recovered_from_the_checkpoint(shards, tmp_path):
    cfg = tiny_config(**{"run.total_iters": 24, "run.checkpoint_every": 6, "run.max_failures": 2})
    events = tmp_path / "events.jsonl"
    result = run(cfg, str(tmp_path / "out"), shards=str(shards),
                 callbacks=[KillAWorkerAtTheFirstCheckpoint(str(events))])
    seen = _events(events)
    assert seen[0] == {"checkpoint": 6, "resumed_from": 0} and "killed" in seen[1]
    failed = next(i for i, e in enumerate(seen) if "failed" in e)  # the controller saw the worker die
    resumed = [e["checkpoint"] for e in seen[:failed] if "checkpoint" in e][-1]
    # the restart resumed from the newest checkpoint the controller had registered when it saw the worker die
    assert [e for e in seen[failed:] if "checkpoint" in e] == [
        {"checkpoint": s, "resumed_from": resumed} for s in range(resumed + 6, 25, 6)]
    rows = read_metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(1, 25))  # the restart's repeated steps replaced, not appended
    assert [r["resumed_from"] for r in rows] == [0] * resumed + [resumed] * (24 - resumed)
    assert result.steps == 24
