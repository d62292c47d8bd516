"""`pretrain --out`: one run at a time, resume keeps the trajectory, stale workers write nothing, files get the
umask's mode, and bad output directories are one-line errors (issue 10.3, 10.4, 10.10, 10.11).

No Ray here: everything tested fails or finishes before the driver starts Ray.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import yaml

from gpfm_scale.cli import main
from gpfm_scale.config import apply_overrides, build_config, dump_config, read_yaml
from gpfm_scale.data.config import CropConfig
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.run_lock import OutputLock
from gpfm_scale.train import worker
from gpfm_scale.train.checkpoint import export_teacher
from gpfm_scale.train.fencing import RunFence, SupersededRunError
from gpfm_scale.train.resume import NON_TRAJECTORY_KEYS, check_out, flatten, truncate_metrics, write_run_config
from gpfm_scale.train.pretrain_config import PretrainConfig
from tests.integration.pretrain_helpers import TINY_YAML, tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A shards dir the CLI accepts (these tests stop before anything reads it)."""
    root = tmp_path_factory.mktemp("shards")
    (root / "tiles-000000.tar").write_bytes(b"")
    return root


def _pretrain(shards, out, *extra: str) -> int:
    return main(["pretrain", "--config", str(TINY_YAML), "--shards", str(shards), "--out", str(out), *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpfm-scale pretrain: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _saved_run(shards, out, **overrides) -> PretrainConfig:
    """`out` as a run of tiny.yaml left it: config.yaml and its checkpoint folder."""
    cfg = tiny_config(**{"loader.shards": [str(shards / "tiles-000000.tar")], **overrides})
    os.makedirs(out / "checkpoints" / cfg.run.name)
    (out / "config.yaml").write_text(dump_config(cfg))
    return cfg


def test_second_run_on_a_locked_out_exits_2_naming_the_holder(shards, tmp_path, capsys):
    with OutputLock(str(tmp_path), "pretrain"):
        assert _pretrain(shards, tmp_path) == 2
    assert "in use by `gpfm-scale pretrain` (pid" in _one_line_error(capsys)
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("kind", ["file", "under_a_file", "read_only_new", "read_only_existing"])
def test_unusable_out_exits_2(shards, tmp_path, capsys, kind):
    (tmp_path / "f").write_text("x")  # root writes through chmod: read-only file systems stand for read-only dirs
    out = {"file": tmp_path / "f", "under_a_file": tmp_path / "f" / "out", "read_only_new": "/proc/gpfm-out",
           "read_only_existing": "/sys"}[kind]
    assert _pretrain(shards, out) == 2
    assert "--out" in _one_line_error(capsys)


@pytest.mark.parametrize("content, message", [("objective: [unclosed\n", "not valid YAML"),
                                              ("grid: {tile_px: 512}\n", "not a pretraining config")])
def test_resume_with_a_broken_or_foreign_config_exits_2(shards, tmp_path, capsys, content, message):
    (tmp_path / "config.yaml").write_text(content)
    assert _pretrain(shards, tmp_path, "--resume") == 2
    assert message in _one_line_error(capsys)
    assert (tmp_path / "config.yaml").read_text() == content


def test_resume_without_the_runs_config_exits_2(shards, tmp_path, capsys):
    (tmp_path / "checkpoints" / "tiny").mkdir(parents=True)
    assert _pretrain(shards, tmp_path, "--resume") == 2
    assert "config.yaml is missing" in _one_line_error(capsys)


def test_resume_refuses_every_trajectory_change_at_once_and_keeps_the_config(shards, tmp_path, capsys):
    _saved_run(shards, tmp_path)
    before = (tmp_path / "config.yaml").read_text()
    code = _pretrain(shards, tmp_path, "--resume", "--set", "run.seed=3", "--set", "schedule.base_lr=0.001",
                     "--set", "loader.batch_size=4", "--workers", "1", "--set", "run.log_every=5")
    assert code == 2
    err = _one_line_error(capsys)
    for change in ("run.seed: 0 -> 3", "schedule.base_lr: 0.002 -> 0.001", "loader.batch_size: 8 -> 4",
                   "run.num_workers: 2 -> 1"):
        assert change in err
    assert "run.log_every:" not in err  # allowed: listed among what may change, not among the differences
    assert (tmp_path / "config.yaml").read_text() == before


def test_resume_accepts_changes_that_keep_the_trajectory(shards, tmp_path):
    saved = _saved_run(shards, tmp_path, **{"run.stop_after_steps": 6})
    new = saved.model_copy(deep=True)
    new.run.stop_after_steps, new.run.log_every, new.run.checkpoint_every = None, 5, 3
    new.run.ray_address, new.loader.prefetch = "127.0.0.1:6379", 4
    check_out(str(tmp_path), new, resume=True)
    write_run_config(str(tmp_path), new)
    assert read_yaml(tmp_path / "config.yaml")["run"]["log_every"] == 5


@pytest.mark.parametrize(("loader_seed", "refused"), [(0, False), (5, True)])
def test_resume_reads_a_run_saved_with_the_loader_seed_copy(shards, tmp_path, loader_seed, refused):
    """A config.yaml written when the loader had its own seed and epoch length: an agreeing copy resumes, a
    differing one (another data order than run.seed gives now) is refused naming both keys."""
    cfg = _saved_run(shards, tmp_path)
    old = read_yaml(tmp_path / "config.yaml")
    old["loader"].update(seed=loader_seed, epoch_length=cfg.schedule.iters_per_epoch)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    if refused:
        with pytest.raises(ConfigError, match=r"loader\.seed 5 != run\.seed 0"):
            check_out(str(tmp_path), cfg, resume=True)
    else:
        check_out(str(tmp_path), cfg, resume=True)


def test_fresh_run_refuses_an_out_holding_another_run(shards, tmp_path):
    _saved_run(shards, tmp_path, **{"run.name": "other"})
    with pytest.raises(ConfigError, match="holds the run 'other'"):
        check_out(str(tmp_path), tiny_config(), resume=False)


def test_non_trajectory_keys_are_config_keys():
    keys = dict(flatten(PretrainConfig().model_dump(mode="json")))
    assert NON_TRAJECTORY_KEYS <= set(keys)
    for refused in ("run.num_workers", "loader.num_workers", "run.seed", "run.total_iters",
                    "deepspeed.zero_stage", "run.name"):
        assert refused not in NON_TRAJECTORY_KEYS


def test_metrics_truncated_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "total": float(s)} for s in range(1, 9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "tot')  # killed mid-write
    old = os.umask(0o002)
    try:
        assert truncate_metrics(str(path), 6) == 3
    finally:
        os.umask(old)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:6]
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert truncate_metrics(str(path), 6) == 0 and truncate_metrics(str(tmp_path / "none.jsonl"), 0) == 0


def test_stale_worker_writes_no_checkpoint_and_no_metrics(tmp_path):
    """A worker of a killed driver (generation `old`) after a new run took --out over (generation `new`)."""
    old = RunFence.start(str(tmp_path))
    new = RunFence.start(str(tmp_path))
    row = {"step": 5, "total": 1.0}
    with pytest.raises(SupersededRunError, match="taken over"):
        worker._append_metrics(old, row)
    with pytest.raises(SupersededRunError, match="checkpoint of step 5"):  # refused before DeepSpeed is touched
        worker._save_and_report(None, row, 4, old)
    with pytest.raises(SupersededRunError):
        old.check("the exported teacher")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".generation"]
    worker._append_metrics(new, row)  # the run that owns --out writes
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == row


def test_published_files_get_the_umask_mode(tmp_path):
    cfg = build_config(ObjectiveConfig, apply_overrides(read_yaml(TINY_YAML)["objective"], {"model.experts": []}))
    old = os.umask(0o002)
    try:
        export_teacher(SSLMetaArch(cfg), cfg.model.backbone, tmp_path / "export", step=1, is_writer=True,
                       crops=CropConfig())
        write_run_config(str(tmp_path), tiny_config())
        RunFence.start(str(tmp_path))
        worker._append_metrics(RunFence(str(tmp_path), (tmp_path / ".generation").read_text()), {"step": 1})
    finally:
        os.umask(old)
    files = ["export/model.safetensors", "export/config.json", "export/warm_start.safetensors", "config.yaml",
             ".generation", "metrics.jsonl"]
    assert {f: oct(stat.S_IMODE((tmp_path / f).stat().st_mode)) for f in files} == {f: "0o664" for f in files}
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors",
                                                                           "warm_start.safetensors"]
