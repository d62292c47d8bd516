"""Issue 3 "Done when": a single-process CPU run of a tiny student with two tiny experts on synthetic two-class
tiles lowers its loss terms and makes a kNN probe on the teacher's CLS beat the same probe on the random-init
model; the same run without experts (DINOv2 only, the seed article's Fig. 8 ablation) is reported beside it.

Sizes: ViT dim 64, depth 2, patch 8; 48-px tiles, 32-px global crops (4 x 4 patches), 2 local crops of 16 px;
batch 32 for 200 steps (about 30 s per run on one free core). Only lengths and rates are overridden (epochs of 10
iterations, short warm-ups, a faster teacher EMA for a run this short), never the structure of the recipe.
One torch thread: on these shared 2-core machines two threads ran a step 10x slower whenever other processes
were busy (3.1 s vs 0.32 s measured), and were no faster when the machine was idle.

What is asserted, and what is only printed (measured, see benchmarks/RESULTS.md "Objective"): the expert terms
and KoLeo fall several-fold in every configuration tried, the total falls with experts, and the teacher's kNN
accuracy beats random init by a wide margin with and without experts. The DINO CLS and iBOT terms do NOT fall in
a run this small: within ~20 steps the DINO head maps every image to the same bottleneck direction (cosine
> 0.99 between images), the centred teacher targets become uniform (teacher entropy = log K) and both terms sit
at their uniform value (dino_global + dino_local = log K). This happened in every one of ~15 settings tried (K 64
to 4,096, bottleneck 16-256, hidden 128-1,024, teacher temperature 0.02-0.07, EMA momentum 0.9-0.996, lr 1e-4 to
2e-3, fixed or trained weight-norm gain, shared or separate iBOT head, iBOT off, milder augmentation, Sinkhorn-
Knopp, 1,500 steps); with a fast teacher (momentum 0.9) the terms oscillate instead. So they are printed, not
asserted; the backbone still learns (KoLeo and the experts drive it), which the kNN probe shows.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpfm_scale.data.augmentations import normalize_uint8
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles
from gpfm_scale.models.config import BackboneConfig, ExpertConfig, HeadConfig, ModelConfig
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.local import LocalRun, train_local

logger = logging.getLogger(__name__)

STEPS, BATCH, SEED, TILE_PX, WINDOW = 200, 32, 0, 48, 20
KNN_K, KNN_T = 20, 0.07  # REFERENCE.md ROI protocol: cosine kNN, k 20, temperature 0.07
EXPERTS = [
    ExpertConfig(name="tiny_a", cls_weight=1.0, patch_weight=0.25),  # UNI-like: CLS + patch tokens
    ExpertConfig(name="tiny_b", cls_weight=1.0, patch_weight=None),  # CONCH-like: pooled embedding only
]
CROP = CropConfig(global_size=32, local_size=16, n_local=2)
SCHEDULE = ScheduleConfig(
    iters_per_epoch=10,
    base_lr=2e-3,
    lr_reference_batch=BATCH,
    warmup_epochs=2,
    warmup_teacher_temp_epochs=2,
    momentum_teacher=0.98,
    final_momentum_teacher=0.995,
)


def objective(experts: list[ExpertConfig]) -> ObjectiveConfig:
    backbone = BackboneConfig(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.0, layerscale_init=0.1
    )
    head = HeadConfig(hidden_dim=512, bottleneck_dim=256, num_prototypes=1024, expert_bottleneck_dim=64)
    return ObjectiveConfig(model=ModelConfig(backbone=backbone, head=head, experts=experts))


def train(experts: list[ExpertConfig], tiles: Tensor) -> LocalRun:
    return train_local(
        objective(experts), OptimConfig(), SCHEDULE, CROP, MaskConfig(), tiles, steps=STEPS, batch_size=BATCH, seed=SEED
    )


@torch.no_grad()
def cls_features(backbone: nn.Module, tiles: Tensor) -> Tensor:
    """L2-normalised CLS [n, D] of whole tiles resized to the global crop size (the evaluation view)."""
    backbone.eval()
    x = F.interpolate(tiles.float(), size=CROP.global_size, mode="bicubic", antialias=True)
    x = normalize_uint8(x.round().clamp(0, 255).to(torch.uint8), CROP.mean, CROP.std)
    return F.normalize(backbone(x)["cls"], dim=-1)


def knn_accuracy(bank: Tensor, bank_y: Tensor, query: Tensor, query_y: Tensor) -> float:
    """Cosine kNN with exp(sim / T)-weighted votes, the DINO / REFERENCE.md protocol; accuracy in [0, 1]."""
    sims, idx = (query @ bank.t()).topk(KNN_K, dim=1)
    votes = torch.zeros(query.shape[0], 2).scatter_add_(1, bank_y[idx], torch.exp(sims / KNN_T))
    return float((votes.argmax(1) == query_y).float().mean())


def probe(backbone: nn.Module, held_out: tuple[Tensor, Tensor]) -> float:
    """kNN accuracy: the first half of the held-out tiles is the bank, the second half the queries."""
    tiles, labels = held_out
    feats, half = cls_features(backbone, tiles), tiles.shape[0] // 2
    return knn_accuracy(feats[:half], labels[:half], feats[half:], labels[half:])


def start_end(history: list[dict[str, float]], key: str) -> tuple[float, float]:
    values = [h[key] for h in history]
    return float(np.mean(values[:WINDOW])), float(np.mean(values[-WINDOW:]))


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def held_out() -> tuple[Tensor, Tensor]:
    return make_two_class_tiles(400, TILE_PX, seed=SEED + 1)


@pytest.fixture(scope="module")
def runs(one_thread) -> dict[str, LocalRun]:
    tiles, _ = make_two_class_tiles(256, TILE_PX, seed=SEED)
    return {"experts": train(EXPERTS, tiles), "dino_only": train([], tiles)}


def test_runs_log_every_term_and_stay_finite(runs: dict[str, LocalRun]) -> None:
    expert_terms = {"expert/tiny_a/cls", "expert/tiny_a/patch", "expert/tiny_b/cls"}
    for name, run in runs.items():
        assert len(run.history) == STEPS
        keys = set(run.history[0])
        assert {"dino_global", "dino_local", "ibot", "koleo", "total", "health/teacher_entropy"} <= keys
        assert expert_terms <= keys if name == "experts" else not expert_terms & keys
        assert all(np.isfinite(v) for h in run.history for v in h.values())


def test_loss_terms_fall_from_the_first_to_the_last_steps(runs: dict[str, LocalRun], capsys) -> None:
    report = {name: {k: start_end(run.history, k) for k in run.history[0] if _is_term(k)} for name, run in runs.items()}
    with capsys.disabled():
        for name, terms in report.items():
            print(f"\n[{name}] mean of the first / last {WINDOW} steps:")
            for key, (first, last) in terms.items():
                print(f"  {key:22s} {first:8.4f} -> {last:8.4f}")
    for name, terms in report.items():
        for key, (first, last) in terms.items():
            if key.startswith("expert/") or key == "koleo":
                assert last < 0.5 * first, (name, key, first, last)
    first, last = report["experts"]["total"]
    assert last < first - 0.5, ("total with experts", first, last)


def _is_term(key: str) -> bool:
    return key in {"dino_global", "dino_local", "ibot", "koleo", "total"} or key.startswith("expert/")


def test_knn_on_the_teacher_beats_random_init_with_and_without_experts(
    runs: dict[str, LocalRun], held_out: tuple[Tensor, Tensor], capsys
) -> None:
    torch.manual_seed(SEED)  # the same initial weights train_local starts from
    random_init = probe(SSLMetaArch(objective(EXPERTS)).teacher["backbone"], held_out)
    accuracy = {name: probe(run.model.teacher["backbone"], held_out) for name, run in runs.items()}
    with capsys.disabled():
        print(
            f"\nkNN (k={KNN_K}, cosine, teacher CLS, {held_out[0].shape[0] // 2} queries): random init "
            f"{random_init:.3f}, GPFM with experts {accuracy['experts']:.3f}, DINOv2 only {accuracy['dino_only']:.3f}"
        )
    assert accuracy["experts"] > random_init + 0.15
    assert accuracy["dino_only"] > random_init + 0.15
