"""The GPFM objective as one module: student, EMA teacher, DINO + iBOT + KoLeo + expert distillation.

Shape of a step (B images, 2 global crops of G px with an N-patch grid, n local crops, K prototypes):
  teacher (no grad, unmasked global crops [2B, 3, G, G]) -> CLS logits [2B, K] and the logits of the M masked
    patch tokens [M, K] -> target probabilities (softmax centring with EMA centres, or Sinkhorn-Knopp);
  student (masked global crops, unmasked local crops) -> CLS logits [2B, K] and [nB, K], masked-token logits
    [M, K], global CLS [2B, D] (KoLeo), and per expert its projection of the global CLS [2B, D_e] and patch
    tokens [2B, N, D_e];
  losses -> DINO (cross-view pairing inside `DinoClsLoss`), iBOT, KoLeo, expert terms, weighted total.

Why the parts are separate public methods (`teacher_forward`, `student_forward`, `compute_losses`): the
benchmark times them one by one, and `forward` is only their composition. `forward` takes one batch dict plus
keyword arguments so that it runs unchanged when called through a DeepSpeed engine; it returns the loss dict
and never calls backward, steps an optimiser or moves tensors to a device (STYLE.md): inputs arrive on the
model's device. `forward_backward` is the single-process convenience the issue names.

The teacher holds copies of the student's backbone and DINO/iBOT heads (not the expert projection heads), stays
in eval mode (no drop-path, as DINOv2 builds its teacher without it) and changes only through `update_teacher`.
Its weights are fp32 *buffers*, not parameters (same names, same modules): nothing optimises them, and DeepSpeed
acts on parameters only. Its bf16 mode casts parameters and leaves buffers in their dtype; ZeRO partitions
parameters only. So the teacher stays a whole fp32 copy on every rank under every ZeRO stage, is saved and
restored exactly with the module's state dict (DeepSpeed checkpoints it), and moves with `.to(device)`. On a
bf16 run the teacher forward runs under bf16 autocast (fp32 weights, bf16 matmuls), as DINOv2's FSDP teacher
computes in 16 bits from fp32 shards. Memory: ViT-L + DINO head is ~330M values, 1.3 GB fp32 per rank, held in
full rather than sharded so that the forward needs no gather and the EMA no bookkeeping of shard layouts.
`update_teacher` pairs teacher tensors with student parameters by name (`teacher_student_param_pairs`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from gpfm_scale.data.batch_keys import GLOBAL_CROPS, LOCAL_CROPS, MASK_INDICES, MASKS, MASKS_WEIGHT, N_MASKED_PATCHES
from gpfm_scale.errors import ConfigError
from gpfm_scale.models.experts import EXPERTS
from gpfm_scale.models.heads import build_dino_head, build_expert_head
from gpfm_scale.models.losses import (
    DinoClsLoss,
    ExpertDistillLoss,
    ExpertTokens,
    IbotPatchLoss,
    KoLeoLoss,
    weighted_total,
)
from gpfm_scale.models.objective_config import ObjectiveConfig
from gpfm_scale.models.vit import build_backbone
from gpfm_scale.models import health
from gpfm_scale.models.ema import update_ema

logger = logging.getLogger(__name__)

NUM_GLOBAL_CROPS = 2
ExpertTargets = Mapping[str, Mapping[str, Tensor | None]]


@dataclass
class TeacherOutput:
    """Teacher targets: cls [2B, D], cls_probs [2B, K] (crop A rows then B), patch_probs [M, K]."""

    cls: Tensor
    cls_probs: Tensor
    patch_probs: Tensor


@dataclass
class StudentOutput:
    """Student outputs: global_cls [2B, D], global_logits [2B, K], local_logits [nB, K] (n may be 0),
    masked_logits [M, K], expert_proj {name: ExpertTokens(cls [2B, D_e], patch [2B, N, D_e] | None)}."""

    global_cls: Tensor
    global_logits: Tensor
    local_logits: Tensor
    masked_logits: Tensor
    expert_proj: dict[str, ExpertTokens] = field(default_factory=dict)


def _crops_as(batch: Mapping[str, Any], dtype: torch.dtype) -> Mapping[str, Any]:
    """The float crops in the parameters' dtype (bf16 when DeepSpeed trains in bf16; the loader yields fp32)."""
    crops = {k: batch[k].to(dtype) for k in (GLOBAL_CROPS, LOCAL_CROPS)
             if isinstance(batch.get(k), Tensor) and batch[k].is_floating_point() and batch[k].dtype != dtype}
    return {**batch, **crops} if crops else batch


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters are buffers of the same names (kept out of DeepSpeed's casting,
    partitioning and optimiser; see the module docstring). Module code reads `self.weight` from either."""
    frozen = copy.deepcopy(module)
    for sub in frozen.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, param.detach().requires_grad_(False))
    return frozen


def _select_masked(patch: Tensor, mask_indices: Tensor) -> Tensor:
    """Masked patch tokens [M, D] from [n, N, D] at flat indices into masks.flatten() (collate order)."""
    return patch.flatten(0, 1).index_select(0, mask_indices.to(patch.device))


def _head_logits(modules: nn.ModuleDict, cls: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
    """(CLS logits, masked-patch logits); one head call on both when the iBOT head is the DINO head."""
    if "ibot_head" in modules:
        return modules["dino_head"](cls), modules["ibot_head"](masked)
    logits = modules["dino_head"](torch.cat([cls, masked]))
    return logits[: cls.shape[0]], logits[cls.shape[0] :]


class SSLMetaArch(nn.Module):
    """Student / EMA teacher pair with the GPFM losses; see the module docstring for the step."""

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        model_cfg, head_cfg = cfg.model, cfg.model.head
        backbone = build_backbone(model_cfg.backbone)
        dim = backbone.embed_dim
        student = {"backbone": backbone, "dino_head": build_dino_head(head_cfg, dim)}
        if not head_cfg.shared_ibot_head:
            student["ibot_head"] = build_dino_head(head_cfg, dim)
        self.teacher = nn.ModuleDict({k: _frozen_copy(m) for k, m in student.items()})
        self.teacher.eval()
        heads = {e.name: build_expert_head(head_cfg, dim, _expert_dim(e.name)) for e in model_cfg.experts}
        self.student = nn.ModuleDict({**student, "expert_heads": nn.ModuleDict(heads)})
        k = head_cfg.num_prototypes
        self.dino_loss = DinoClsLoss(k, cfg.student_temp, cfg.center_momentum)
        self.ibot_loss = IbotPatchLoss(k, cfg.student_temp, cfg.center_momentum)
        self.koleo_loss = KoLeoLoss(cfg.koleo_eps)
        self.expert_loss = ExpertDistillLoss(model_cfg.experts)
        self.term_weights: dict[str, float] = {**cfg.loss.as_mapping(), **self.expert_loss.term_weights}
        logger.info("SSL meta-arch: %s centring, experts %s", cfg.centering, [e.name for e in model_cfg.experts])

    def train(self, mode: bool = True) -> SSLMetaArch:
        """Switch the student (and losses); the teacher stays in eval mode (no drop-path) whatever `mode` is."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.cfg.model.experts]

    @property
    def student_dtype(self) -> torch.dtype:
        """The student's parameter dtype: bf16 once DeepSpeed's bf16 mode has cast it, else fp32."""
        return next(self.student.parameters()).dtype

    def clipped_modules(self) -> dict[str, list[nn.Parameter]]:
        """{module: trainable parameters} for gradient clipping, one norm each: the backbone, the DINO head and
        the iBOT head when separate, as DINOv2 clips every `model.student` module (dinov2 train/train.py:247-260).
        The expert projection heads are absent: GPFM keeps them outside its clipped student and never clips them.
        """
        return {name: [p for p in module.parameters() if p.requires_grad]
                for name, module in self.student.items() if name != "expert_heads"}

    def teacher_student_param_pairs(self) -> list[tuple[str, Tensor, nn.Parameter]]:
        """(name, teacher tensor, student parameter) for every teacher tensor, matched by name.

        Raises RuntimeError when the teacher and the student's teacher-shaped part do not have exactly the
        same parameter names and shapes (e.g. a module added to one side only), which would corrupt the EMA.
        """
        teacher = {**dict(self.teacher.named_parameters()), **dict(self.teacher.named_buffers())}
        student = {n: p for n, p in self.student.named_parameters() if n.split(".", 1)[0] in self.teacher}
        if teacher.keys() != student.keys():
            only_t, only_s = sorted(teacher.keys() - student.keys()), sorted(student.keys() - teacher.keys())
            raise RuntimeError(f"teacher/student parameters differ: teacher only {only_t}, student only {only_s}")
        for name, t in teacher.items():
            shape = getattr(student[name], "ds_shape", student[name].shape)  # ZeRO-3 leaves a (0,) placeholder
            if t.shape != shape:
                raise RuntimeError(f"{name}: teacher {tuple(t.shape)} vs student {tuple(shape)}")
        return [(name, teacher[name], student[name]) for name in teacher]

    @torch.no_grad()
    def update_teacher(self, momentum: float, student_fp32: Callable[[nn.Parameter], Tensor] | None = None) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student over the name-matched pairs, in fp32.

        `student_fp32` maps a student parameter to its exact fp32 value, whole (default: the parameter itself,
        which must then be fp32: single-process or fp32 training). Under DeepSpeed pass
        `gpfm_scale.train.engine.fp32_master` (the optimiser's fp32 master weights; collective under ZeRO).
        """
        pairs = self.teacher_student_param_pairs()
        source = student_fp32 if student_fp32 is not None else _own_fp32
        update_ema([t for _, t, _ in pairs], (source(s) for _, _, s in pairs), momentum)

    @torch.no_grad()
    def teacher_forward(self, batch: Mapping[str, Any], teacher_temp: float) -> TeacherOutput:
        """Teacher on the unmasked global crops -> CLS and masked-token targets (updates the softmax centres).

        fp32 weights; under bf16 autocast when the student is bf16 (same compute precision as the student)."""
        crops, dtype = batch[GLOBAL_CROPS], self.student_dtype
        # nullcontext for an fp32 student: leaves a caller's own autocast (the benchmark's AMP baseline) in force
        bf16 = torch.autocast(crops.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with bf16:
            out = self.teacher["backbone"](crops)
            masked = _select_masked(out["patch"], batch[MASK_INDICES])
            cls_logits, patch_logits = _head_logits(self.teacher, out["cls"], masked)
        cls_logits, patch_logits = cls_logits.float(), patch_logits.float()  # centring and softmax in fp32
        if self.cfg.centering == "softmax":
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            self.ibot_loss.update_center(patch_logits)
        else:
            iterations = self.cfg.sinkhorn_iterations
            n_masked = batch[N_MASKED_PATCHES].to(patch_logits.device)
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp, iterations)
            patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp, n_masked, iterations)
        return TeacherOutput(out["cls"], cls_probs, patch_probs)

    def student_forward(self, batch: Mapping[str, Any]) -> StudentOutput:
        """Student on the masked global crops and the local crops, through the DINO/iBOT and expert heads."""
        backbone = self.student["backbone"]
        glob = backbone(batch[GLOBAL_CROPS], batch[MASKS])
        local = batch.get(LOCAL_CROPS)
        local_cls = glob["cls"][:0]
        if local is not None and local.numel():
            local_cls = backbone(local)["cls"]
        masked = _select_masked(glob["patch"], batch[MASK_INDICES])
        n_global = glob["cls"].shape[0]
        cls_logits, masked_logits = _head_logits(self.student, torch.cat([glob["cls"], local_cls]), masked)
        proj, heads = {}, cast(nn.ModuleDict, self.student["expert_heads"])
        for e in self.cfg.model.experts:
            head = heads[e.name]
            patch = head(glob["patch"]) if e.patch_weight is not None else None
            proj[e.name] = ExpertTokens(head(glob["cls"]), patch)
        return StudentOutput(glob["cls"], cls_logits[:n_global], cls_logits[n_global:], masked_logits, proj)

    def compute_losses(
        self,
        student: StudentOutput,
        teacher: TeacherOutput,
        batch: Mapping[str, Any],
        expert_targets: ExpertTargets | None,
    ) -> dict[str, Tensor]:
        """Unweighted terms (dino_global, dino_local, ibot, koleo, expert/<name>/{cls,patch}) plus "total".

        Every loss is computed in fp32 whatever the model's dtype (bf16 under DeepSpeed on GPU): softmaxes at
        temperature 0.1 and KoLeo's log nearest-neighbour distances lose too much in bf16."""
        terms = self.dino_loss(student.global_logits.float(), student.local_logits.float(), teacher.cls_probs)
        masks_weight = batch[MASKS_WEIGHT].to(student.masked_logits.device)
        terms["ibot"] = self.ibot_loss(student.masked_logits.float(), teacher.patch_probs, batch[MASKS],
                                       masks_weight)
        terms["koleo"] = self.koleo_loss(student.global_cls.float(), num_chunks=NUM_GLOBAL_CROPS)
        proj = {name: ExpertTokens(t.cls.float(), None if t.patch is None else t.patch.float())
                for name, t in student.expert_proj.items()}
        terms.update(self.expert_loss(proj, self._checked_targets(expert_targets)))
        terms["total"] = weighted_total(terms, self.term_weights)
        return terms

    def forward(
        self,
        batch: Mapping[str, Any],
        expert_targets: ExpertTargets | None,
        teacher_temp: float,
        with_health: bool = True,
    ) -> dict[str, Tensor | float]:
        """One objective evaluation on a collated batch (`collate_multicrop` keys, float crops on device).

        expert_targets: {expert name: {"cls": [2B, D_e], "patch": [2B, N', D_e] | None}} from the experts on
        the batch's uint8 global crops (required iff experts are configured). Returns the loss terms and
        "total" as tensors, plus `health/*` detached Python floats when `with_health`.
        """
        batch = _crops_as(batch, self.student_dtype)
        teacher = self.teacher_forward(batch, teacher_temp)
        student = self.student_forward(batch)
        out: dict[str, Tensor | float] = dict(self.compute_losses(student, teacher, batch, expert_targets))
        if with_health:
            out.update(self.health_signals(student, teacher, expert_targets))
        return out

    def forward_backward(
        self, batch: Mapping[str, Any], expert_targets: ExpertTargets | None, teacher_temp: float
    ) -> dict[str, float]:
        """forward, total.backward(), every entry as a float (single-process training and tests)."""
        out = self(batch, expert_targets=expert_targets, teacher_temp=teacher_temp)
        cast(Tensor, out["total"]).backward()
        return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in out.items()}

    @torch.no_grad()
    def health_signals(
        self, student: StudentOutput, teacher: TeacherOutput, expert_targets: ExpertTargets | None
    ) -> dict[str, float]:
        """Collapse signals (see models/health.py) on this batch; KL pairs each crop with its own teacher view."""
        signals = {
            "health/teacher_entropy": health.teacher_entropy(teacher.cls_probs),
            "health/kl_teacher_student": health.kl_teacher_student(
                teacher.cls_probs, student.global_logits, self.cfg.student_temp
            ),
            "health/effective_rank_student": health.effective_rank(student.global_cls),
            "health/effective_rank_teacher": health.effective_rank(teacher.cls),
            "health/koleo_guarded": float(self.koleo_loss.num_guarded),
            "health/masked_tokens": float(student.masked_logits.shape[0]),
        }
        for name, proj in student.expert_proj.items():
            if expert_targets is not None:
                target = cast(Tensor, expert_targets[name]["cls"])
                signals[f"health/expert_cos/{name}"] = health.expert_cosine(proj.cls, target)
        return signals

    def _checked_targets(self, expert_targets: ExpertTargets | None) -> ExpertTargets:
        """The targets, after checking they name exactly the configured experts."""
        given = sorted(expert_targets or {})
        if given != sorted(self.expert_names):
            raise ValueError(f"expert targets for {given}, but the objective distils from {sorted(self.expert_names)}")
        return expert_targets or {}


def _own_fp32(param: nn.Parameter) -> Tensor:
    """The parameter itself as the EMA source, refused unless fp32 (a bf16 copy would feed rounded weights)."""
    if param.dtype != torch.float32:
        raise TypeError(f"the student is {param.dtype}: pass its fp32 master weights to update_teacher")
    return param.detach()


def _expert_dim(name: str) -> int:
    """Width D_e of an expert's targets, from its registry spec (without building the expert)."""
    try:
        return EXPERTS.get(name).spec.embed_dim
    except KeyError as err:
        raise ConfigError(f"experts: {err.args[0]}") from None
