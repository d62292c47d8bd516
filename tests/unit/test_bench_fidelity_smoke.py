"""Smoke test of benchmarks/bench_fidelity.py (`--smoke`: 3 expert epochs, 12 student steps, 200 resamples).

What is checked: the expert is trained, written as safetensors and rebuilt from that file by `build_expert`; the
two students start from one initialisation (every shared tensor compared) and are both trained; every model gets
kNN and linear-probe metrics with bootstrap intervals on held-out crops kept apart by region; the JSON carries the
closeness figures. Asserted only where the margin is wide: the supervised expert beats chance (1/3 for 3 classes)
by far. Whether the distilled student is closer to the expert is the full run's question (RESULTS.md), not a
12-step smoke run's.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch

from tests.benchmark_scripts import import_benchmark



def _ci_holds(metric: dict) -> bool:
    return metric["ci_low"] <= metric["value"] <= metric["ci_high"]


def test_smoke_run_trains_expert_and_two_students_and_writes_json(shared_data, tmp_path):
    bench_fidelity = import_benchmark("bench_fidelity")

    out = tmp_path / "run"
    result = bench_fidelity.main(["--smoke", "--data", str(shared_data / "hgsc-nuclei"), "--out", str(out)])
    assert json.loads((out / "fidelity.json").read_text()) == result

    weights = safetensors.torch.load_file(str(out / "expert.safetensors"))
    assert "head.weight" in weights and weights["cls_token"].shape[-1] == bench_fidelity.HgscExpert.spec.embed_dim
    assert result["identical_init"] == {"tensors_compared": result["identical_init"]["tensors_compared"], "equal": True}
    assert result["identical_init"]["tensors_compared"] > 20

    counts = result["split_counts"]
    assert counts["test"] > 150 and counts["val"] > 50 and sum(counts.values()) == 1552
    assert set(result["metrics"]) == {"expert", "distilled", "dino_only", "random_init"}
    for model in result["metrics"].values():
        for task in ("knn", "linear_probe"):
            assert _ci_holds(model[task]["balanced_accuracy"])
    assert result["metrics"]["expert"]["knn"]["balanced_accuracy"]["value"] > 0.6  # chance: 1/3
    assert {"expert/hgsc_vit/cls", "expert/hgsc_vit/patch", "dino_global", "koleo"} <= set(
        result["losses"]["distilled"]["last10"])
    assert not any(k.startswith("expert/") for k in result["losses"]["dino_only"]["first10"])

    close = result["closeness"]
    for key in ("knn/gap_reduction", "linear_probe/gap_reduction", "cka_gain", "cka_distilled", "cka_dino_only",
                "knn/agreement_distilled", "knn/agreement_dino_only"):
        assert _ci_holds(close[key]), key
    assert 0.0 <= close["cka_distilled"]["value"] <= 1.0
    assert set(result["verdicts"]) == {"knn_gap_smaller_with_distillation",
                                       "linear_probe_gap_smaller_with_distillation", "cka_higher_with_distillation"}


def test_students_share_their_initialisation():
    """The check itself: same seed -> equal tensors; the expert heads come after and change nothing shared."""
    bench_fidelity = import_benchmark("bench_fidelity")
    from gpfm_scale.models.config import ExpertConfig

    cfg = ExpertConfig(name=bench_fidelity.EXPERT_NAME, patch_weight=0.25)
    models, compared = bench_fidelity.shared_init(cfg, seed=3)
    distilled, dino = models["distilled"], models["dino_only"]
    assert compared == len(dino.state_dict())
    assert "expert_heads" in dict(distilled.student.named_children())
    assert not dict(dino.student["expert_heads"].named_parameters())
    for name, tensor in dino.state_dict().items():
        assert distilled.state_dict()[name].equal(tensor), name


def test_differing_initialisations_are_refused(monkeypatch):
    """If the two builds drew different weights, the benchmark stops instead of comparing unlike students."""
    bench_fidelity = import_benchmark("bench_fidelity")
    import torch

    from gpfm_scale.models.config import ExpertConfig

    draws = iter((0, 1))  # the second build draws from another seed
    real_seed = torch.manual_seed
    monkeypatch.setattr(bench_fidelity.torch, "manual_seed", lambda _s: real_seed(next(draws)))
    with pytest.raises(RuntimeError, match="initialisations differ"):
        bench_fidelity.shared_init(ExpertConfig(name=bench_fidelity.EXPERT_NAME), seed=0)
