"""The inference actor's batch contract and the resource plan that keeps Ray Data from waiting forever."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpfm_scale.embed.config import EmbedConfig
from gpfm_scale.embed.models import describe_model
from gpfm_scale.embed.predictor import Predictor, autocast_dtype, plan_resources
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.models.experts import build_expert


def test_predictor_embeds_good_rows_and_passes_other_columns_through():
    cfg = EmbedConfig()
    predictor = Predictor(describe_model("expert:tiny_a", cfg), cfg.model_dump_json(), "cpu", threads=1)
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    out = predictor({"image": images, "ok": np.array([True, False, True]), "slide_id": np.array(["a", "a", "b"])})
    assert set(out) == {"ok", "slide_id", "features"} and out["slide_id"].tolist() == ["a", "a", "b"]
    assert out["features"].dtype == np.float32 and out["features"].shape == (3, 48)  # the default (issue 13.2)
    expected = build_expert(ExpertConfig(name="tiny_a"))(torch.from_numpy(images[[0, 2]]))["cls"].numpy()
    np.testing.assert_allclose(out["features"][[0, 2]].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert not out["features"][1].any()


def test_predictor_with_parts_out_writes_the_features_and_returns_only_a_summary_per_slide(tmp_path):
    cfg = EmbedConfig(feature_dtype="float32")
    predictor = Predictor(describe_model("expert:tiny_a", cfg), cfg.model_dump_json(), "cpu", threads=1,
                          parts_out=str(tmp_path))
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    batch = {"image": images, "ok": np.array([True, True, False]), "slide_id": np.array(["a", "b", "b"]),
             "index": np.array([0, 0, -1]), "x": np.array([5, 6, -1]), "y": np.array([7, 8, -1]),
             "error": np.array(["", "", ""]), "total": np.array([-1, -1, 1])}
    out = predictor(batch)
    assert "features" not in out and out["slide_id"].tolist() == ["a", "b"]
    assert out["n_ok"].tolist() == [1, 1] and out["total"].tolist() == [-1, 1]
    with np.load(tmp_path / "parts" / "b" / out["part"][1]) as part:
        assert part["features"].dtype == np.float32 and part["coords"].tolist() == [[6, 8]]
        expected = build_expert(ExpertConfig(name="tiny_a"))(torch.from_numpy(images[[1]]))["cls"].numpy()
        np.testing.assert_allclose(part["features"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cluster", "overrides", "expected"), [
    ({"CPU": 16}, {}, (7, 1.0, 0.0)),  # (16 - 1 read slot) / 2
    ({"CPU": 2}, {}, (1, 1.0, 0.0)),
    ({"CPU": 16, "GPU": 8}, {}, (8, 1.0, 1.0)),  # one actor per GPU
    ({"CPU": 2}, {"num_actors": 2, "cpus_per_actor": 0.5}, (2, 0.5, 0.0)),
])
def test_resource_plan(cluster, overrides, expected):
    plan = plan_resources(EmbedConfig(**overrides), cluster)
    assert (plan.num_actors, plan.cpus_per_actor, plan.gpus_per_actor) == expected
    assert plan.device == ("cuda" if expected[2] else "cpu")


def test_resource_plan_refuses_actors_that_starve_the_readers():
    with pytest.raises(ConfigError, match="wait forever"):
        plan_resources(EmbedConfig(num_actors=2), {"CPU": 2})
    with pytest.raises(ConfigError, match="GPU"):
        plan_resources(EmbedConfig(gpus_per_actor=1), {"CPU": 8})


def test_precision_defaults():
    assert autocast_dtype(EmbedConfig(), "cuda") is torch.bfloat16
    assert autocast_dtype(EmbedConfig(), "cpu") is None
    assert autocast_dtype(EmbedConfig(dtype="float16"), "cuda") is torch.float16
