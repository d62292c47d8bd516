"""Packing a stage's resource bundles onto nodes, and the wait's clear failure when the cluster has no GPU."""

from __future__ import annotations

import logging

import pytest

from gpfm_scale.errors import GpfmError, ResourcesUnavailableError
from gpfm_scale.resources import count_fitting, describe, leading_fit, wait_for_resources

GPU_NODE = {"CPU": 96.0, "GPU": 8.0, "memory": 1e12}
CPU_NODE = {"CPU": 64.0, "tiling": 64.0}
HEAD = {"CPU": 0.0, "memory": 1e10}


def test_bundles_never_straddle_nodes():
    worker = {"GPU": 1.0, "CPU": 8.0}
    assert leading_fit([worker] * 12, [HEAD]) == 0
    assert leading_fit([worker] * 12, [HEAD, GPU_NODE]) == 8
    assert leading_fit([worker] * 12, [HEAD, GPU_NODE, GPU_NODE]) == 12
    assert leading_fit([{"CPU": 3.0}] * 2, [{"CPU": 2.0}, {"CPU": 2.0}]) == 0  # 4 CPUs, but 2 per node
    assert count_fitting({"CPU": 1.0, "tiling": 1.0}, [HEAD, GPU_NODE, CPU_NODE]) == 64  # not the GPU node's CPUs
    assert count_fitting({"CPU": 0.5}, [{"CPU": 2.0}, {"CPU": 1.0}]) == 6


def test_leading_fit_counts_in_order():
    """The count stops at the first bundle that fits nowhere: a stage's minimum is a prefix of its list."""
    assert leading_fit([{"GPU": 1.0}, {"CPU": 1.0}], [{"CPU": 4.0}]) == 0
    assert leading_fit([{"CPU": 1.0}, {"GPU": 1.0}], [{"CPU": 4.0}]) == 1


def test_describe_groups_equal_bundles():
    assert describe([{"GPU": 1.0, "CPU": 8.0}] * 12) == "12 x {GPU: 1, CPU: 8}"
    assert describe([{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 1.0}]) == "1 x {CPU: 1} + 1 x {CPU: 0.5} + 1 x {CPU: 1}"


def test_a_gpu_wait_without_gpus_fails_with_a_clear_message(ray_session, caplog):
    import ray

    assert ray.cluster_resources().get("GPU", 0) == 0
    with caplog.at_level(logging.INFO, logger="gpfm_scale.resources"):
        with pytest.raises(ResourcesUnavailableError) as err:
            wait_for_resources([{"GPU": 1.0, "CPU": 1.0}] * 2, what="training workers", timeout_s=1.0)
    assert isinstance(err.value, GpfmError)  # the CLI's exit 2
    msg = str(err.value)
    assert msg.startswith("training workers: waited 1 s for 2 x {GPU: 1, CPU: 1} but only 0/2 fit")
    assert "resources_timeout_s" in msg and "\n" not in msg
    assert "waiting for 2 x {GPU: 1, CPU: 1}: 0/2 available; the autoscaler is starting nodes" in caplog.text


def test_a_wait_that_fits_returns_at_once(ray_session):
    assert wait_for_resources([{"CPU": 0.5}], what="x", timeout_s=1e-3) == 1


def test_a_local_instance_fails_at_once_as_no_node_will_join(ray_session, monkeypatch):
    """`ensure_ray` started this machine's own instance: no autoscaler, so the wait does not sit out its timeout."""
    monkeypatch.setattr("gpfm_scale.resources.started_local", lambda: True)
    with pytest.raises(ResourcesUnavailableError, match=r"local Ray instance offers 0/1 of 1 x \{GPU: 1\} \(need 1\) "
                                                        r"and adds no nodes"):
        wait_for_resources([{"GPU": 1.0}], what="embedding", timeout_s=1e6)


def test_recipes_never_train_on_cpu_and_yaml_yes_is_yes():
    from gpfm_scale.config import build_config, load_config
    from gpfm_scale.train.pretrain_config import PretrainConfig

    for name, expected in [("vitl14_gpfm", "yes"), ("vitl14_dinov2_phase1", "yes"), ("tiny", "auto")]:
        assert load_config(PretrainConfig, f"gpfm_scale/configs/{name}.yaml").run.use_gpu == expected, name
    assert build_config(PretrainConfig, {"run": {"use_gpu": True}}).run.use_gpu == "yes"  # YAML's bare `yes`
    assert build_config(PretrainConfig, {"run": {"use_gpu": False}}).run.use_gpu == "no"


def test_tiling_actor_resources_are_custom_and_positive():
    from gpfm_scale.config import build_config
    from gpfm_scale.errors import ConfigError
    from gpfm_scale.tiling.config import TilingConfig

    assert build_config(TilingConfig, {"actor_resources": {"tiling": 1}}).actor_resources == {"tiling": 1.0}
    assert TilingConfig().actor_resources == {}
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        build_config(TilingConfig, {"actor_resources": {"CPU": 2}})
    with pytest.raises(ConfigError, match="must be > 0"):
        build_config(TilingConfig, {"actor_resources": {"tiling": 0}})


def test_auto_gpu_on_a_cpu_cluster_says_it_trains_on_cpu(ray_session, caplog):
    from gpfm_scale.train.pretrain_config import PretrainConfig
    from gpfm_scale.train.stage import await_workers

    cfg = PretrainConfig.model_validate({"run": {"num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": None}})
    with caplog.at_level(logging.WARNING, logger="gpfm_scale.train.stage"):
        assert await_workers(cfg) is False
    assert "no GPU in the cluster, training on CPU (set run.use_gpu: yes" in caplog.text


def test_the_cli_exits_2_when_the_gpus_never_come(ray_session, tmp_path, capsys):
    from pathlib import Path

    from gpfm_scale.cli import main

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").touch()  # never read: the run stops at its resource wait
    tiny = Path(__file__).resolve().parents[2] / "gpfm_scale" / "configs" / "tiny.yaml"
    rc = main(["pretrain", "--config", str(tiny), "--shards", str(shards), "--out", str(tmp_path / "out"),
               "--set", "run.use_gpu=yes", "--set", "run.resources_timeout_s=1"])
    assert rc == 2
    assert ("gpfm-scale pretrain: error: training workers: waited 1 s for 2 x {CPU: 1, GPU: 1} but only 0/2 fit"
            in capsys.readouterr().err)
