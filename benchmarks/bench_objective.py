"""Objective benchmark: where one training step of the GPFM objective spends its time, and how fast it runs.

One step = expert targets on the uint8 global crops -> the trainers' `train_step` (train/step.py): teacher forward
(no grad) -> student forward (masked globals + locals, DINO/iBOT and expert heads) -> losses (+ health signals) ->
backward, then per-module clipping to the preset's `OptimConfig.clip_grad` with the optimiser step ("optimizer")
and the EMA teacher update. `forward_backward` is the teacher + student + losses + health + backward part; the
experts run before it (in-process here; remote actors in the distributed job).

Presets:
- `tiny` (default on CPU): the integration test's model (ViT dim 64, depth 2, patch 8; 32-px globals, 2 x 16-px
  locals; K 1024) at batch 32 with the tiny experts `tiny_a`, `tiny_b`.
- `vitl` (default with a GPU): the recipe: ViT-L/14 student and teacher at 224 px, 8 local crops of 98 px, DINO head
  with 65,536 prototypes, batch 32 images, and the three experts (UNI ViT-L/16, Phikon ViT-B/16, CONCH ViT-B/16 at
  448 px + attentional pooling) at RANDOM INIT: `EXPERTS.get(name)(preprocessing=...)` builds each registry entry's
  exact architecture without weights (the constructor is what `build_expert` calls before `load_weights`; we skip
  `build_expert` because it refuses an expert without a weight file). Experts run in bf16, student/teacher under
  bf16 autocast on CUDA. Timing does not depend on the weights' values.

Timing: `parts` runs the step with a device synchronisation around each part (a few percent slower than an
uninstrumented step) and reports median seconds and each part's share of the step; `step` runs uninstrumented
steps and gives images/s (B tiles per step, each tile = 2 global + n local crops). FLOPs: counted by
`torch.utils.flop_counter.FlopCounterMode` over experts + forward + backward (matmuls, convolutions, attention;
elementwise ops are not counted, so this is the usual "model FLOPs"); MFU = FLOPs / step seconds / peak, with the
peak dense bf16 rate from `--peak-tflops` (default: 989 TFLOP/s for H100/H200 SXM, no default on other devices).

Run: python benchmarks/bench_objective.py [--preset tiny|vitl] [--device cpu|cuda] [--repeats 10] [--profile]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from gpfm_scale.data.augmentations import MultiCropTransform
from gpfm_scale.data.collate import collate_multicrop
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.synthetic_tiles import make_two_class_tiles
from gpfm_scale.models.config import BackboneConfig, ExpertConfig, HeadConfig, ModelConfig, default_experts
from gpfm_scale.models.experts import EXPERTS, Expert
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.models.vit import Backbone
from gpfm_scale.train.build import build_local_trainer, build_model, student_grid
from gpfm_scale.train.config import OptimConfig, ScheduleConfig
from gpfm_scale.train.local import expert_targets
from gpfm_scale.train.step import LocalEngine, StepResult, Timer, train_step

log = logging.getLogger("bench_objective")

PARTS = ("experts", "teacher", "student", "losses", "health", "backward", "optimizer", "ema")
FORWARD_BACKWARD = ("teacher", "student", "losses", "health", "backward")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM parts (NVIDIA datasheets)
TOTAL_ITERS, STEP = 500_000, 100_000  # every step runs with the recipe's schedule values at step 100k (mid-run)


@dataclass(frozen=True)
class Preset:
    objective: ObjectiveConfig
    crop: CropConfig
    batch: int
    tile_px: int
    optim: OptimConfig = field(default_factory=OptimConfig)  # clipping, param groups: the recipe's by default


def tiny_preset(batch: int) -> Preset:
    backbone = BackboneConfig(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.0, layerscale_init=0.1
    )
    head = HeadConfig(hidden_dim=512, bottleneck_dim=256, num_prototypes=1024, expert_bottleneck_dim=64)
    experts = [ExpertConfig(name="tiny_a", patch_weight=0.25), ExpertConfig(name="tiny_b")]
    model = ModelConfig(backbone=backbone, head=head, experts=experts)
    return Preset(ObjectiveConfig(model=model), CropConfig(global_size=32, local_size=16, n_local=2), batch, 48)


def vitl_preset(batch: int) -> Preset:
    """The recipe's defaults everywhere (ViT-L/14, 65,536 prototypes, 2 x 224 + 8 x 98 crops, UNI/Phikon/CONCH)."""
    return Preset(ObjectiveConfig(model=ModelConfig(experts=default_experts())), CropConfig(), batch, 256)


def build_random_experts(cfgs: list[ExpertConfig], device: torch.device, dtype: torch.dtype) -> dict[str, Expert]:
    """Registry architectures at random init, frozen, on `device` in `dtype` (no weight files needed)."""
    experts = {}
    for cfg in cfgs:
        expert = EXPERTS.get(cfg.name)(preprocessing=cfg.preprocessing)
        expert.freeze()
        experts[cfg.name] = expert.to(device=device, dtype=dtype)
    return experts


def make_batch(preset: Preset, device: torch.device, seed: int = 0) -> tuple[dict[str, Any], float]:
    """One collated multi-crop batch of synthetic tiles (built on CPU, then moved to `device`), and the CPU seconds
    the multi-crop transform + collate took (the data loader's work per step, not part of the timed step)."""
    tiles, _ = make_two_class_tiles(preset.batch, preset.tile_px, seed)
    transform = MultiCropTransform(preset.crop)
    grid = student_grid(preset.objective, preset.crop)
    start = time.perf_counter()
    samples = [transform(tile, generator=seed + i) for i, tile in enumerate(tiles)]
    batch = collate_multicrop(samples, MaskConfig(), grid, rng=np.random.default_rng(seed))
    data_s = time.perf_counter() - start
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return moved, data_s


class PartsEngine(LocalEngine):
    """`LocalEngine` whose forward runs `SSLMetaArch.forward`'s parts one by one, each under `timer` (teacher,
    student, losses, health), so that the benchmark reports where the forward's time goes."""

    def __init__(self, engine: LocalEngine) -> None:
        super().__init__(engine.module, engine.optimizer, engine.autocast)
        self.timer: Timer = lambda _name: nullcontext()

    def __call__(self, batch: dict[str, Any], expert_targets: Any, *, teacher_temp: float) -> dict[str, Any]:
        model, part = cast(SSLMetaArch, self.module), self.timer
        with self.autocast_context():
            with part("teacher"):
                teacher = model.teacher_forward(batch, teacher_temp)
            with part("student"):
                student = model.student_forward(batch)
            with part("losses"):
                terms: dict[str, Any] = dict(model.compute_losses(student, teacher, batch, expert_targets))
            with part("health"):
                terms.update(model.health_signals(student, teacher, expert_targets))
        return terms


class Step:
    """Everything one training step needs: the trainers' `train_step` on a `PartsEngine`, with the experts (and
    each part of the forward) callable alone (for the timer and the profiler)."""

    def __init__(self, preset: Preset, device: torch.device, grad_checkpointing: bool, seed: int = 0) -> None:
        cuda = device.type == "cuda"
        self.device, self.preset = device, preset
        self.model = build_model(preset.objective, seed, device=device)
        if grad_checkpointing:
            cast(Backbone, self.model.student["backbone"]).set_grad_checkpointing(True)
        self.experts = build_random_experts(
            preset.objective.model.experts, device, torch.bfloat16 if cuda else torch.float32
        )
        trainer = build_local_trainer(self.model, preset.optim, ScheduleConfig(), seed=seed, total_batch=preset.batch,
                                      total_iters=TOTAL_ITERS, autocast=torch.bfloat16 if cuda else None)
        self.engine = PartsEngine(cast(LocalEngine, trainer.engine))
        self.trainer = replace(trainer, engine=self.engine)
        self.values = self.trainer.schedules.at(STEP)
        self.batch, self.data_s = make_batch(preset, device)
        self.grid = student_grid(preset.objective, preset.crop)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, timer: Timer | None = None) -> StepResult:
        """One full step; `timer(part)` wraps each part when given ("forward" wraps the four forward parts)."""
        part = timer or (lambda _name: nullcontext())
        self.engine.timer = part
        with part("experts"):
            targets = expert_targets(self.experts, self.batch["global_crops_uint8"], self.grid) if self.experts else None
        return train_step(self.trainer, self.batch, targets, STEP, timer)


def time_parts(step: Step, repeats: int) -> dict[str, float]:
    """Median seconds per part over `repeats` instrumented steps."""
    samples: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def timer(name: str) -> Iterator[None]:
        step.sync()
        start = time.perf_counter()
        yield
        step.sync()
        samples[name].append(time.perf_counter() - start)

    for _ in range(repeats):
        step.run(timer)
    return {name: statistics.median(samples[name]) for name in PARTS if name in samples}


def time_steps(step: Step, repeats: int) -> float:
    """Median seconds of an uninstrumented full step."""
    seconds = []
    for _ in range(repeats):
        step.sync()
        start = time.perf_counter()
        step.run()
        step.sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def count_flops(step: Step) -> dict[str, int]:
    """FLOPs of experts, forward (teacher + student + losses) and backward, from FlopCounterMode."""
    optimizer = step.engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    model, batch, out = step.model, step.batch, {}
    with FlopCounterMode(display=False) as counter:
        targets = expert_targets(step.experts, batch["global_crops_uint8"], step.grid) if step.experts else None
    out["experts"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, step.engine.autocast_context():
        terms = model.compute_losses(
            model.student_forward(batch), model.teacher_forward(batch, step.values.teacher_temp), batch, targets
        )
    out["forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        terms["total"].backward()
    out["backward"] = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    return out


def profile(step: Step, rows: int = 20) -> str:
    """torch.profiler table of one step (sorted by device time on CUDA, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if step.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step.run()
        step.sync()
    key = "self_device_time_total" if step.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _dtypes(module: torch.nn.Module) -> str:
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})) or "none"


def param_dtypes(step: Step) -> dict[str, str | None]:
    """The dtypes the parameters are held in, read from the model, and the autocast dtype the matmuls run in.

    The teacher must stay float32: each EMA update moves a weight by (1 - momentum) <= 0.008 of its distance to
    the student's, mostly below bf16's relative resolution (2^-8), so a bf16 teacher would stop following."""
    experts = ",".join(sorted({_dtypes(e) for e in step.experts.values()})) or "none"
    return {"teacher_param_dtype": _dtypes(step.model.teacher), "student_param_dtype": _dtypes(step.model.student),
            "expert_param_dtype": experts,
            "autocast_dtype": "bfloat16" if step.device.type == "cuda" else None}


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def report(preset: Preset, parts: dict[str, float], step_s: float, flops: dict[str, int], peak: float | None) -> dict:
    fb_total = sum(parts[p] for p in FORWARD_BACKWARD)
    step_total = sum(parts.values())
    n_crops = 2 + preset.crop.n_local
    result: dict[str, Any] = {
        "parts_s": parts,
        "share_of_experts_plus_forward_backward": {
            p: parts[p] / (fb_total + parts["experts"]) for p in ("experts", *FORWARD_BACKWARD)
        },
        "share_of_step": {p: parts[p] / step_total for p in parts},
        "forward_backward_s": fb_total,
        "step_s": step_s,
        "images_per_s": preset.batch / step_s,
        "crops_per_s": preset.batch * n_crops / step_s,
        "flops": flops,
    }
    total_flops = sum(flops.values())
    result["achieved_tflops"] = total_flops / step_s / 1e12
    result["mfu"] = result["achieved_tflops"] / peak if peak else None
    return result


def print_report(result: dict, preset: Preset, device: str) -> None:
    print(
        f"\n{device}: batch {preset.batch} tiles x (2 x {preset.crop.global_size} px + {preset.crop.n_local} x "
        f"{preset.crop.local_size} px)"
    )
    print(f"{'part':10s} {'median ms':>10s} {'share of experts+fwd/bwd':>26s} {'share of step':>14s}")
    for part, seconds in result["parts_s"].items():
        share = result["share_of_experts_plus_forward_backward"].get(part)
        share_txt = f"{100 * share:25.1f}%" if share is not None else f"{'-':>26s}"
        print(f"{part:10s} {1e3 * seconds:10.2f} {share_txt} {100 * result['share_of_step'][part]:13.1f}%")
    flops = result["flops"]
    print(
        f"forward_backward {1e3 * result['forward_backward_s']:.1f} ms; full step (uninstrumented) "
        f"{1e3 * result['step_s']:.1f} ms = {result['images_per_s']:.3g} images/s ({result['crops_per_s']:.3g} crops/s)"
    )
    print(
        "GFLOPs per step: "
        + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items())
        + f"; achieved {result['achieved_tflops']:.3f} TFLOP/s"
        + (f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] is not None else " (no peak given: no MFU)")
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=("tiny", "vitl"), default=None, help="default: vitl on cuda, tiny on cpu")
    p.add_argument("--batch", type=int, default=32, help="tiles per step (each = 2 global + n local crops)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for the MFU")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one step")
    p.add_argument("--json", default=None, help="write the figures to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset_name = args.preset or ("vitl" if device.type == "cuda" else "tiny")
    preset = (vitl_preset if preset_name == "vitl" else tiny_preset)(args.batch)
    step = Step(preset, device, args.grad_checkpointing)
    for _ in range(args.warmup):
        step.run()
    parts = time_parts(step, args.repeats)
    step_s = time_steps(step, args.repeats)
    flops = count_flops(step)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = report(preset, parts, step_s, flops, peak_tflops(args, device))
    result.update(preset=preset_name, device=name, batch=preset.batch, threads=args.threads, torch=torch.__version__)
    result["data_cpu_s"] = step.data_s
    result.update(param_dtypes(step))
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result["peak_memory_gib"] = peak_gib
    print_report(result, preset, f"{preset_name} on {name}")
    print(f"multi-crop + collate of one batch on the CPU (data loader work, not in the step): {step.data_s:.3f} s")
    print(f"parameters: teacher {result['teacher_param_dtype']}, student {result['student_param_dtype']}, "
          f"experts {result['expert_param_dtype']}; autocast {result['autocast_dtype']}")
    if peak_gib is not None:
        print(f"peak memory {peak_gib:.1f} GiB")
    if args.profile:
        print(profile(step))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
