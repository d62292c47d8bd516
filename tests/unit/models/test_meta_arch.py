"""SSLMetaArch: teacher without gradients, EMA by name, cross-view pairing, masked student, loss dict, options.

Reference values are computed here from the model's own sub-modules called one crop set at a time (backbone ->
head -> softmax), independently of the meta-architecture's batching, concatenation and pairing code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpfm_scale.errors import ConfigError
from gpfm_scale.models.config import BackboneConfig, ExpertConfig, HeadConfig, ModelConfig
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig

B, N_LOCAL, G, L, PATCH, K = 4, 2, 32, 16, 8, 64
GRID = (G // PATCH) ** 2  # 16 patch tokens per global crop
TEMP = 0.05
EXPERTS = [
    ExpertConfig(name="tiny_a", cls_weight=1.0, patch_weight=0.25),  # dim 48, patch tokens
    ExpertConfig(name="tiny_b", cls_weight=0.5, patch_weight=None),  # dim 32, CLS only
]
TERMS = {"dino_global", "dino_local", "ibot", "koleo"}
EXPERT_TERMS = {"expert/tiny_a/cls", "expert/tiny_a/patch", "expert/tiny_b/cls"}
HEALTH = {
    "health/teacher_entropy",
    "health/kl_teacher_student",
    "health/effective_rank_student",
    "health/effective_rank_teacher",
    "health/koleo_guarded",
    "health/masked_tokens",
}


def make_cfg(experts: list[ExpertConfig] | None = None, **objective: object) -> ObjectiveConfig:
    backbone = BackboneConfig(
        img_size=G, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0, layerscale_init=1.0
    )
    head = HeadConfig(hidden_dim=48, bottleneck_dim=16, num_prototypes=K, expert_bottleneck_dim=16)
    model = ModelConfig(backbone=backbone, head=head, experts=list(EXPERTS if experts is None else experts))
    return ObjectiveConfig(model=model, **objective)


def make_model(experts: list[ExpertConfig] | None = None, seed: int = 0, **objective: object) -> SSLMetaArch:
    torch.manual_seed(seed)
    return SSLMetaArch(make_cfg(experts, **objective)).train()


def make_batch(masks: Tensor | None = None, same_views: bool = False, seed: int = 1) -> dict[str, Tensor]:
    """A collate-shaped batch of random float crops; masks [2B, GRID] bool (default: none masked)."""
    g = torch.Generator().manual_seed(seed)
    crop_a = torch.randn(B, 3, G, G, generator=g)
    crop_b = crop_a.clone() if same_views else torch.randn(B, 3, G, G, generator=g)
    masks = torch.zeros(2 * B, GRID, dtype=torch.bool) if masks is None else masks
    n_i = masks.sum(-1)
    return {
        "global_crops": torch.cat([crop_a, crop_b]),
        "local_crops": torch.randn(N_LOCAL * B, 3, L, L, generator=g),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / n_i.clamp(min=1).float()).unsqueeze(-1).expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([int(masks.sum())]),
    }


def random_masks(seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * B, GRID, generator=g) < 0.4
    masks[0, :3] = True  # at least one masked token
    masks[1] = False  # one unmasked image, as half the crops are in the recipe
    return masks


def random_targets(seed: int = 3) -> dict[str, dict[str, Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tiny_a": {"cls": torch.randn(2 * B, 48, generator=g), "patch": torch.randn(2 * B, GRID, 48, generator=g)},
        "tiny_b": {"cls": torch.randn(2 * B, 32, generator=g), "patch": None},
    }


def floats(out: dict[str, Tensor | float]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else v for k, v in out.items()}


def ce(student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1) -> Tensor:
    """Mean over rows of -sum p_t log softmax(s / T)."""
    return -(teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1)).sum(-1).mean()


def test_loss_dict_keys_and_weighted_total() -> None:
    model = make_model()
    out = model(make_batch(random_masks()), random_targets(), TEMP)
    expected_health = HEALTH | {"health/expert_cos/tiny_a", "health/expert_cos/tiny_b"}
    assert set(out) == TERMS | EXPERT_TERMS | {"total"} | expected_health
    weights = {"dino_global": 1, "dino_local": 1, "ibot": 1, "koleo": 0.1}
    weights |= {"expert/tiny_a/cls": 1.0, "expert/tiny_a/patch": 0.25, "expert/tiny_b/cls": 0.5}
    values = floats(out)
    by_hand = sum(w * values[k] for k, w in weights.items())
    assert values["total"] == pytest.approx(by_hand, rel=1e-6)
    assert all(isinstance(out[k], float) for k in expected_health)
    assert all(isinstance(out[k], Tensor) and out[k].requires_grad for k in TERMS - {"dino_local"})


def test_without_experts_the_expert_terms_are_absent_and_total_excludes_them() -> None:
    model = make_model(experts=[])
    assert len(model.student["expert_heads"]) == 0
    out = floats(model(make_batch(random_masks()), None, TEMP))
    assert set(out) == TERMS | {"total"} | HEALTH
    by_hand = out["dino_global"] + out["dino_local"] + out["ibot"] + 0.1 * out["koleo"]
    assert out["total"] == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="expert targets"):
        model(make_batch(), random_targets(), TEMP)


def test_missing_expert_targets_and_unknown_experts_are_refused() -> None:
    with pytest.raises(ValueError, match="expert targets"):
        make_model()(make_batch(), None, TEMP)
    with pytest.raises(ConfigError, match="no_such_expert"):
        make_model(experts=[ExpertConfig(name="no_such_expert")])


def test_teacher_gets_no_gradients_and_stays_in_eval_mode() -> None:
    model = make_model()
    logs = model.forward_backward(make_batch(random_masks()), random_targets(), TEMP)
    assert all(math.isfinite(v) for v in logs.values())
    assert list(model.teacher.parameters()) == []  # fp32 buffers: out of every optimiser and of DeepSpeed's casts
    assert all(not t.requires_grad and t.grad is None for t in model.teacher.buffers())
    student_grads = {n: p.grad for n, p in model.student.named_parameters() if p.requires_grad}
    assert all(g is not None for g in student_grads.values()), [n for n, g in student_grads.items() if g is None]
    assert float(student_grads["backbone.vit.blocks.0.attn.qkv.weight"].abs().sum()) > 0
    assert float(student_grads["expert_heads.tiny_b.mlp.weight"].abs().sum()) > 0
    assert model.student.training and not model.teacher.training


def test_ema_after_one_step_equals_the_formula_on_every_parameter() -> None:
    model = make_model()
    pairs = model.teacher_student_param_pairs()
    assert {n for n, _, _ in pairs} == {n for n, _ in model.teacher.named_buffers()}
    assert all(torch.equal(t, s) for _, t, s in pairs)  # the teacher starts as a copy
    before = {n: t.detach().clone() for n, t, _ in pairs}
    optimizer = torch.optim.SGD([p for p in model.student.parameters() if p.requires_grad], lr=0.5)
    model.forward_backward(make_batch(random_masks()), random_targets(), TEMP)
    optimizer.step()
    assert all(torch.equal(t, before[n]) for n, t, _ in pairs)  # forward/backward/step leave the teacher alone
    momentum = 0.9
    model.update_teacher(momentum)
    moved = 0
    for name, teacher, student in pairs:
        expected = momentum * before[name] + (1 - momentum) * student.detach()
        torch.testing.assert_close(teacher.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
        moved += int(not torch.equal(teacher, before[name]))
    assert moved > len(pairs) // 2


def test_update_teacher_reads_the_given_fp32_source_and_refuses_a_bf16_student() -> None:
    """Under DeepSpeed the source is the optimiser's fp32 master copy, not the (bf16) module parameter."""
    model = make_model(experts=[])
    before = {n: t.clone() for n, t, _ in model.teacher_student_param_pairs()}
    masters = {id(s): torch.full_like(s, 2.0, dtype=torch.float32) for _, _, s in model.teacher_student_param_pairs()}
    for p in model.student.parameters():  # what DeepSpeed's bf16 mode does: parameters cast, buffers left alone
        p.data = p.data.to(torch.bfloat16)
    with pytest.raises(TypeError, match="fp32 master"):
        model.update_teacher(0.5)
    model.update_teacher(0.5, student_fp32=lambda s: masters[id(s)])
    for name, teacher, _ in model.teacher_student_param_pairs():
        assert teacher.dtype == torch.float32
        torch.testing.assert_close(teacher, 0.5 * before[name] + 1.0, rtol=0, atol=0)


def test_parameter_pairing_is_checked_by_name() -> None:
    model = make_model(experts=[])
    model.teacher["dino_head"].extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="teacher only"):
        model.teacher_student_param_pairs()


def _reference_dino(model: SSLMetaArch, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(cross-view global, same-view global, local, teacher logits) from separate per-view calls."""
    a, b = batch["global_crops"].chunk(2)
    with torch.no_grad():
        t_logits = [model.teacher["dino_head"](model.teacher["backbone"](x)["cls"]) for x in (a, b)]
        t_probs = [F.softmax(z / TEMP, dim=-1) for z in t_logits]  # the centre is still 0 at the first step
        s_a, s_b = (model.student["dino_head"](model.student["backbone"](x)["cls"]) for x in (a, b))
        s_local = [
            model.student["dino_head"](model.student["backbone"](x)["cls"]) for x in batch["local_crops"].chunk(N_LOCAL)
        ]
    n_terms = 2 + 2 * N_LOCAL
    cross = (ce(s_a, t_probs[1]) + ce(s_b, t_probs[0])) / n_terms
    same = (ce(s_a, t_probs[0]) + ce(s_b, t_probs[1])) / n_terms
    local = sum(ce(s, t_probs[0]) + ce(s, t_probs[1]) for s in s_local) / n_terms
    return cross, same, local, torch.cat(t_logits)


@pytest.mark.parametrize("same_views", [False, True])
def test_dino_pairs_teacher_crop_a_with_student_crop_b(same_views: bool) -> None:
    model = make_model(experts=[])
    batch = make_batch(same_views=same_views)
    cross, same, local, teacher_logits = _reference_dino(model, batch)
    out = floats(model(batch, None, TEMP))
    assert out["dino_global"] == pytest.approx(float(cross), rel=1e-5)
    assert out["dino_local"] == pytest.approx(float(local), rel=1e-5)
    if same_views:  # identical crops: both pairings give the same value
        assert float(cross) == pytest.approx(float(same), rel=1e-6)
    else:  # different crops: the pairing matters, and the meta-arch uses the crossed one
        assert abs(float(cross) - float(same)) > 1e-2 * float(cross)
    torch.testing.assert_close(model.dino_loss.center, 0.1 * teacher_logits.mean(0, keepdim=True))


def test_swapping_the_two_global_crops_leaves_the_symmetric_dino_loss_unchanged() -> None:
    batch = make_batch()
    swapped = dict(batch, global_crops=torch.cat(batch["global_crops"].chunk(2)[::-1]))
    first = floats(make_model(experts=[])(batch, None, TEMP))
    second = floats(make_model(experts=[])(swapped, None, TEMP))
    assert first["dino_global"] == pytest.approx(second["dino_global"], rel=1e-5)


def test_masked_student_forward_uses_the_mask_token_and_the_teacher_does_not() -> None:
    model = make_model(experts=[])
    masks = random_masks()
    batch = make_batch(masks)
    base_student = model.student_forward(batch)
    base_teacher = model.teacher_forward(batch, TEMP)
    assert base_student.masked_logits.shape == (int(masks.sum()), K)
    with torch.no_grad():
        model.student["backbone"].mask_token.normal_(0.0, 3.0)
        model.teacher["backbone"].mask_token.normal_(0.0, 3.0)
    changed = model.student_forward(batch)
    masked_rows = masks.any(-1)
    diff = (changed.global_logits - base_student.global_logits).abs().amax(-1)
    assert torch.all(diff[masked_rows] > 1e-4) and torch.all(diff[~masked_rows] < 1e-6)
    torch.testing.assert_close(model.teacher_forward(batch, TEMP).cls, base_teacher.cls)  # teacher sees no mask
    unmasked = make_batch()
    torch.testing.assert_close(
        model.student_forward(unmasked).global_logits, make_model(experts=[]).student_forward(unmasked).global_logits
    )


def test_ibot_term_against_a_per_image_reference() -> None:
    model = make_model(experts=[])
    masks = random_masks()
    batch = make_batch(masks)
    with torch.no_grad():
        t_patch = model.teacher["backbone"](batch["global_crops"])["patch"]
        s_patch = model.student["backbone"](batch["global_crops"], masks)["patch"]
        expected = torch.zeros(())
        for i in range(2 * B):
            if masks[i].any():
                t = F.softmax(model.teacher["dino_head"](t_patch[i][masks[i]]) / TEMP, dim=-1)
                expected += ce(model.student["dino_head"](s_patch[i][masks[i]]), t)
    out = floats(model(batch, None, TEMP))
    assert out["ibot"] == pytest.approx(float(expected) / (2 * B), rel=1e-5)


def test_zero_masked_tokens_give_a_zero_ibot_term_and_still_train() -> None:
    model = make_model()
    logs = model.forward_backward(make_batch(), random_targets(), TEMP)
    assert logs["ibot"] == 0.0 and logs["health/masked_tokens"] == 0.0
    assert math.isfinite(logs["total"]) and torch.equal(model.ibot_loss.center, torch.zeros(1, K))


def test_sinkhorn_option_runs_without_touching_the_centres() -> None:
    model = make_model(centering="sinkhorn")
    batch = make_batch(random_masks())
    teacher = model.teacher_forward(batch, TEMP)
    torch.testing.assert_close(teacher.cls_probs.sum(-1), torch.ones(2 * B))
    torch.testing.assert_close(teacher.patch_probs.sum(-1), torch.ones(int(batch["masks"].sum())))
    logs = model.forward_backward(batch, random_targets(), TEMP)
    assert all(math.isfinite(v) for v in logs.values())
    assert torch.equal(model.dino_loss.center, torch.zeros(1, K))


def test_separate_ibot_head_is_built_and_paired() -> None:
    cfg = make_cfg(experts=[])
    cfg.model.head.shared_ibot_head = False
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    assert "ibot_head" in model.student and "ibot_head" in model.teacher
    assert any(n.startswith("ibot_head.") for n, _, _ in model.teacher_student_param_pairs())
    logs = model.forward_backward(make_batch(random_masks()), None, TEMP)
    assert logs["ibot"] > 0.0
    assert model.student["ibot_head"].mlp[0].weight.grad is not None


def test_a_bf16_model_takes_fp32_crops_and_computes_its_losses_in_fp32() -> None:
    # What DeepSpeed's bf16 mode does to the module (parameters cast, buffers such as the fp32 teacher kept,
    # inputs left to the caller): the fp32 crops
    # of the loader are cast on entry and every term comes out fp32, close to the fp32 model's on the same batch.
    batch, targets = make_batch(random_masks()), random_targets()
    fp32 = make_model()
    bf16 = make_model()
    for p in bf16.parameters():
        p.data = p.data.to(torch.bfloat16)
    ref = fp32(batch, expert_targets=targets, teacher_temp=TEMP, with_health=False)
    out = bf16(batch, expert_targets=targets, teacher_temp=TEMP, with_health=False)
    out["total"].backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    for term in TERMS | EXPERT_TERMS | {"total"}:
        assert float(out[term].detach()) == pytest.approx(float(ref[term].detach()), rel=0.05, abs=0.02), term
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in bf16.parameters())
    assert all(t.dtype == torch.float32 for t in bf16.teacher.buffers())  # the teacher ran under bf16 autocast
