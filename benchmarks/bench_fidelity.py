"""Fidelity benchmark: does expert distillation move the student towards the expert it distils from?

The tiny experts of the tests are random, so the demo cannot show what the expert terms do. Here the expert knows
something: a small ViT classifier trained (supervised, on CPU) on the real hgsc-nuclei crops (64-px H&E nuclei,
3 classes), wrapped as an `Expert` (CLS + patch tokens, loaded from its safetensors file by `build_expert`, as a
real expert is). Two students start from the SAME initialisation (same seed; every tensor of the student and
teacher compared before training) and train the same number of steps on the same unlabelled training crops, with
the same batches, crops and masks (`train_local` draws them from (seed, step) only):
- `distilled`: DINO + iBOT + KoLeo + the expert's CLS and patch terms;
- `dino_only`: DINO + iBOT + KoLeo.
The only difference is the expert terms. On held-out crops, the teacher backbones' CLS features (whole crop resized
to the 32-px global size) are scored with the project's kNN and linear probe (`evaluate.patch_tasks`), as are the
expert's own CLS and the shared random init. "Closer to the expert" is measured three ways, each with a paired
percentile bootstrap over the test crops (`evaluate.metrics`, the same resamples for every model):
- the score gap |balanced accuracy(expert) - balanced accuracy(student)| (kNN and linear probe), and its
  reduction gap(dino_only) - gap(distilled) (> 0: the distilled student is closer);
- agreement: the share of test crops where the student's kNN prediction equals the expert's;
- linear CKA between the student's and the expert's test features (representation similarity, 0..1).

Split: by 250-px regions of the two source images (rows of one region stay in one split), stratified by class.
A split by source image is impossible here: one of the two images has 5 neoplastic nuclei, so either split would
lack a class. Regions keep neighbouring, overlapping crops out of both sides of the split.

Run: python benchmarks/bench_fidelity.py [--steps 300] [--expert-epochs 30] [--out DIR] [--smoke]
Writes DIR/expert.safetensors (the trained expert; never commit it) and DIR/fidelity.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from threadpoolctl import threadpool_limits
from timm.models.vision_transformer import VisionTransformer

from gpfm_scale.atomic import write_bytes_atomic
from gpfm_scale.data.augmentations import normalize_uint8
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.evaluate.config import EvaluateConfig, ProbeConfig, SplitConfig
from gpfm_scale.evaluate.metrics import Metric, balanced_accuracy, bootstrap_mean, bootstrap_statistic
from gpfm_scale.evaluate.patch_tasks import knn, linear_probe
from gpfm_scale.evaluate.splits import PatchData, assign_splits
from gpfm_scale.models.config import BackboneConfig, ExpertConfig, HeadConfig, ModelConfig, Preprocessing
from gpfm_scale.models.experts import EXPERTS, Expert, ExpertSpec, build_expert
from gpfm_scale.contracts.model_input import IMAGENET_MEAN, IMAGENET_STD
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.models.vit import create_vit
from gpfm_scale.train.build import build_model
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.local import train_local

log = logging.getLogger("bench_fidelity")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hgsc-nuclei"
EXPERT_NAME = "hgsc_vit"
REGION_PX = 250  # side of the spatial blocks the split keeps together (source images are 1500 px)
BATCH = 32
CROP = CropConfig(global_size=32, local_size=16, n_local=2)
STUDENTS = ("distilled", "dino_only")
SCHEDULED = ("step", "step_seconds", "lr", "wd", "momentum", "teacher_temp")  # history keys that are no loss
COMPARED = (*STUDENTS, "random_init")  # what is compared with the expert (random_init: the students' shared start)


@EXPERTS.register(EXPERT_NAME)
class HgscExpert(Expert):
    """A supervised ViT classifier of hgsc-nuclei crops (32 px, patch 8, dim 64, 3 blocks, 3 classes) as an expert:
    CLS [B, 64] and 4 x 4 patch tokens [B, 16, 64] after the final norm; the class head is kept in the weight file
    (it is part of `self.model`) but not used by `encode`."""

    spec = ExpertSpec(EXPERT_NAME, 64, 32, IMAGENET_MEAN, IMAGENET_STD, 8, True,
                      "trained by benchmarks/bench_fidelity.py on hgsc-nuclei; stays in the run's output folder")
    model: VisionTransformer
    num_classes = 3

    def __init__(self, preprocessing: Preprocessing = "own") -> None:
        super().__init__(preprocessing)
        self.model = create_vit("vit_base_patch16_224", pretrained=False, img_size=self.spec.input_size,
                                patch_size=self.spec.patch_size, embed_dim=self.spec.embed_dim, depth=3,
                                num_heads=4, num_classes=self.num_classes, dynamic_img_size=True)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        tokens = self.model.forward_features(x)
        return {"cls": tokens[:, 0], "patch": tokens[:, self.model.num_prefix_tokens:]}


def load_crops(root: Path) -> tuple[torch.Tensor, pd.DataFrame]:
    """uint8 crops [N, 3, 64, 64] and the label table (file, class, source_image, centroid_x/y, region)."""
    table = pd.read_csv(root / "labels.csv").sort_values("file", kind="stable").reset_index(drop=True)
    crops = np.stack([np.asarray(Image.open(root / f).convert("RGB")) for f in table["file"]])
    block = (table["centroid_x"] // REGION_PX).astype(int).astype(str) + "_" + \
        (table["centroid_y"] // REGION_PX).astype(int).astype(str)
    table["region"] = table["source_image"] + ":" + block
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous(), table


def augment(crops: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree turns of a uint8 batch (nuclei have no orientation)."""
    if torch.rand((), generator=gen) < 0.5:
        crops = crops.flip(-1)
    if torch.rand((), generator=gen) < 0.5:
        crops = crops.flip(-2)
    return torch.rot90(crops, int(torch.randint(0, 4, (), generator=gen)), dims=(-2, -1))


def train_expert(
    crops: torch.Tensor, y: np.ndarray, split: np.ndarray, epochs: int, seed: int
) -> tuple[HgscExpert, dict[str, float]]:
    """Supervised training on the train crops (class-weighted cross-entropy, AdamW, cosine lr); the weights kept
    are those of the epoch with the best validation balanced accuracy."""
    torch.manual_seed(seed)
    expert = HgscExpert()
    net = expert.model.train()
    train_idx = torch.from_numpy(np.flatnonzero(split == "train"))
    val_idx = np.flatnonzero(split == "val")
    labels = torch.from_numpy(y)
    counts = np.bincount(y[split == "train"], minlength=HgscExpert.num_classes)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * -(-len(train_idx) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = -1.0, copy.deepcopy(net.state_dict()), 0
    for epoch in range(epochs):
        net.train()
        for batch in train_idx[torch.randperm(len(train_idx), generator=gen)].split(64):
            x = expert.preprocess(augment(crops[batch], gen))
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), labels[batch]).backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            pred = net(expert.preprocess(crops[val_idx])).argmax(1).numpy()
        score = balanced_accuracy(y[val_idx], pred, HgscExpert.num_classes)
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(net.state_dict()), epoch + 1
    net.load_state_dict(best_state)
    log.info("expert: best val balanced accuracy %.3f at epoch %d of %d", best, best_epoch, epochs)
    return expert, {"val_balanced_accuracy": best, "best_epoch": best_epoch, "epochs": epochs}


def save_and_load_expert(expert: HgscExpert, out: Path) -> tuple[Expert, ExpertConfig]:
    """Write the weights as safetensors and build the expert from that file the way training does."""
    path = out / "expert.safetensors"
    state = {k: v.contiguous() for k, v in expert.model.state_dict().items()}
    write_bytes_atomic(str(path), safetensors.torch.save(state))
    cfg = ExpertConfig(name=EXPERT_NAME, weights=path, cls_weight=1.0, patch_weight=0.25)
    return build_expert(cfg), cfg


def objective(experts: list[ExpertConfig]) -> ObjectiveConfig:
    """The integration test's tiny student (ViT dim 64, depth 2, patch 8, 32-px globals; K 1024)."""
    backbone = BackboneConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.0,
                              layerscale_init=0.1)
    head = HeadConfig(hidden_dim=512, bottleneck_dim=256, num_prototypes=1024, expert_bottleneck_dim=64)
    return ObjectiveConfig(model=ModelConfig(backbone=backbone, head=head, experts=experts))


def schedule(steps: int) -> ScheduleConfig:
    """The integration test's short-run schedule, stretched to `steps` (10 epochs of steps / 10 iterations)."""
    return ScheduleConfig(iters_per_epoch=max(steps // 10, 1), base_lr=2e-3, lr_reference_batch=BATCH,
                          warmup_epochs=1, warmup_teacher_temp_epochs=1, momentum_teacher=0.98,
                          final_momentum_teacher=0.995)


def shared_init(expert_cfg: ExpertConfig, seed: int) -> tuple[dict[str, SSLMetaArch], int]:
    """Both students from `seed`; raises when any student/teacher tensor they share differs. The expert heads are
    built after the backbone and DINO head, so they do not shift the shared part's initialisation."""
    models = {}
    for name, experts in zip(STUDENTS, ([expert_cfg], [])):
        models[name] = build_model(objective(experts), seed)
    a, b = (m.state_dict() for m in models.values())
    shared = sorted(b)  # every tensor of the DINO-only model (the distilled one adds expert heads)
    differ = [k for k in shared if not torch.equal(a[k], b[k])]
    if differ:
        raise RuntimeError(f"the students' initialisations differ in {differ[:5]}")
    return models, len(shared)


@torch.no_grad()
def backbone_features(backbone: torch.nn.Module, crops: torch.Tensor) -> np.ndarray:
    """CLS [N, D] of whole crops resized to the global crop size and normalised as in training."""
    backbone.eval()
    x = F.interpolate(crops.float(), size=CROP.global_size, mode="bicubic", antialias=True)
    x = normalize_uint8(x.round().clamp(0, 255).to(torch.uint8), CROP.mean, CROP.std)
    return backbone(x)["cls"].numpy()


@torch.no_grad()
def expert_features(expert: Expert, crops: torch.Tensor) -> np.ndarray:
    return torch.cat([expert(chunk)["cls"] for chunk in crops.split(256)]).numpy()


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of features x [n, D1] and y [n, D2]: 1 = same up to rotation/scale."""
    x, y = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def score(features: dict[str, np.ndarray], y: np.ndarray, classes: tuple[str, ...], split: np.ndarray,
          ids: np.ndarray, cfg: EvaluateConfig) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """kNN and linear-probe metrics (test split, bootstrap CIs) per model, and each task's test-row predictions."""
    metrics, preds = {}, {}
    for name, feats in features.items():
        data = PatchData(np.ascontiguousarray(feats, dtype=np.float32), y, classes, split, ids)
        metrics[name], preds[name] = {}, {}
        for task, fn in (("knn", knn), ("linear_probe", linear_probe)):
            result = fn(data, cfg)
            metrics[name][task] = {k: v.to_dict() for k, v in result.metrics.items()}
            preds[name][task] = np.asarray(result.scores).argmax(1)
    return metrics, preds


def closeness(features: dict[str, np.ndarray], preds: dict[str, dict[str, np.ndarray]], y_test: np.ndarray,
              test: np.ndarray, cfg: EvaluateConfig) -> dict[str, Any]:
    """Paired bootstrap (same resamples for every model) of gaps, agreement and CKA to the expert, test rows only."""
    n, boot, seed, level, c = len(y_test), cfg.bootstrap, cfg.seed, cfg.ci_level, int(y_test.max()) + 1
    expert = preds["expert"]

    def gap(model: str, task: str) -> Callable[[np.ndarray], float]:
        def fn(i: np.ndarray) -> float:
            return abs(balanced_accuracy(y_test[i], expert[task][i], c) - balanced_accuracy(y_test[i],
                                                                                            preds[model][task][i], c))
        return fn

    out: dict[str, Any] = {}
    for task in ("knn", "linear_probe"):
        for model in COMPARED:
            out[f"{task}/gap_{model}"] = bootstrap_statistic(gap(model, task), n, boot, seed, level)
        gd, gs = gap("distilled", task), gap("dino_only", task)
        out[f"{task}/gap_reduction"] = bootstrap_statistic(lambda i: gs(i) - gd(i), n, boot, seed, level)
    ex = features["expert"][test]
    for model in COMPARED:
        out[f"knn/agreement_{model}"] = bootstrap_mean(preds[model]["knn"] == expert["knn"], boot, seed, level)
        feats = features[model][test]
        out[f"cka_{model}"] = bootstrap_statistic(lambda i: linear_cka(feats[i], ex[i]), n, boot, seed, level)
    dist, dino = features["distilled"][test], features["dino_only"][test]
    out["cka_gain"] = bootstrap_statistic(lambda i: linear_cka(dist[i], ex[i]) - linear_cka(dino[i], ex[i]), n, boot,
                                          seed, level)
    return {k: v.to_dict() for k, v in out.items()}


def window_means(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each loss term and health signal over some steps of a `train_local` history."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in SCHEDULED}


def verdicts(close: dict[str, Any]) -> dict[str, bool]:
    """A claim holds when its bootstrap interval lies entirely above 0 (large, clear gaps only)."""
    def above_zero(key: str) -> bool:
        low = close[key]["ci_low"]
        return low is not None and low > 0

    return {"knn_gap_smaller_with_distillation": above_zero("knn/gap_reduction"),
            "linear_probe_gap_smaller_with_distillation": above_zero("linear_probe/gap_reduction"),
            "cka_higher_with_distillation": above_zero("cka_gain")}


def print_report(result: dict[str, Any]) -> None:
    fmt = lambda m: str(Metric.from_dict(m))  # noqa: E731
    print(f"\nheld-out crops: {result['split_counts']['test']} (split: {result['split_rule']})")
    print(f"{'model':10s} {'kNN balanced acc [95% CI]':>28s} {'linear probe balanced acc':>28s} {'CKA to expert':>24s}")
    for name, m in result["metrics"].items():
        cka = fmt(result["closeness"][f"cka_{name}"]) if name in COMPARED else "-"
        print(f"{name:10s} {fmt(m['knn']['balanced_accuracy']):>28s} "
              f"{fmt(m['linear_probe']['balanced_accuracy']):>28s} {cka:>24s}")
    for key, value in result["closeness"].items():
        if not key.startswith("cka_") or key == "cka_gain":
            print(f"  {key:32s} {fmt(value)}")
    print("verdicts (CI above 0):", ", ".join(f"{k} {v}" for k, v in result["verdicts"].items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="hgsc-nuclei folder (labels.csv + PNG crops)")
    p.add_argument("--out", type=Path, default=Path("out/bench-fidelity"), help="expert weights and fidelity.json")
    p.add_argument("--steps", type=int, default=300, help="training steps of each student (batch 32)")
    p.add_argument("--expert-epochs", type=int, default=30)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="12 steps, 3 expert epochs, 200 resamples: a < 60 s check")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.expert_epochs, args.bootstrap = 12, 3, 200
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if not (args.data / "labels.csv").is_file():
        raise SystemExit(f"no hgsc-nuclei data at {args.data} (labels.csv missing)")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    crops, table = load_crops(args.data)
    classes = tuple(sorted(table["class"].unique()))
    y = np.searchsorted(np.array(classes), table["class"].to_numpy()).astype(np.int64)
    split_cfg = SplitConfig(group_column="region")
    split = assign_splits(table, y, split_cfg, args.seed)
    eval_cfg = EvaluateConfig(seed=args.seed, bootstrap=args.bootstrap, split=split_cfg,
                              probe=ProbeConfig(max_epochs=30 if args.smoke else 100))
    trained, expert_info = train_expert(crops, y, split, args.expert_epochs, args.seed)
    expert, expert_cfg = save_and_load_expert(trained, args.out)
    expert_s = time.perf_counter() - start
    models, n_shared = shared_init(expert_cfg, args.seed)
    features = {"random_init": backbone_features(models["dino_only"].teacher["backbone"], crops)}
    tiles = crops[torch.from_numpy(np.flatnonzero(split == "train"))]
    student_s, histories = {}, {}
    for name, experts in zip(STUDENTS, ({EXPERT_NAME: expert}, {})):
        t0 = time.perf_counter()
        run = train_local(models[name].cfg, OptimConfig(), schedule(args.steps), CROP,
                          MaskConfig(), tiles, steps=args.steps, batch_size=BATCH, seed=args.seed, experts=experts,
                          model=models[name])
        student_s[name], histories[name] = time.perf_counter() - t0, run.history
        features[name] = backbone_features(run.model.teacher["backbone"], crops)
    features["expert"] = expert_features(expert, crops)
    features = {k: features[k] for k in ("expert", *STUDENTS, "random_init")}
    ids = table["file"].to_numpy()
    test = split == "test"
    with threadpool_limits(args.threads):  # threaded BLAS on tiny matrices: 20x slower on a busy 2-core machine
        metrics, preds = score(features, y, classes, split, ids, eval_cfg)
        close = closeness(features, preds, y[test], test, eval_cfg)
    losses = {name: {"first10": window_means(hist[:10]), "last10": window_means(hist[-10:])}
              for name, hist in histories.items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "split_rule": f"stratified, grouped by {REGION_PX}-px regions of the 2 source images",
        "split_counts": {s: int((split == s).sum()) for s in ("train", "val", "test")},
        "identical_init": {"tensors_compared": n_shared, "equal": True},
        "expert": {**expert_info, "weights": str(args.out / "expert.safetensors")},
        "seconds": {"expert": expert_s, **{f"student_{k}": v for k, v in student_s.items()},
                    "total": time.perf_counter() - start},
        "losses": losses, "metrics": metrics, "closeness": close, "verdicts": verdicts(close),
    }
    (args.out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print(f"seconds: {', '.join(f'{k} {v:.1f}' for k, v in result['seconds'].items())}; "
          f"JSON: {args.out / 'fidelity.json'}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
