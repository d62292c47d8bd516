"""`backbone.grad_checkpointing`: the same loss and gradients as the plain forward, with blocks run again in backward.

Drop-path is on (0.3) so that the recomputation must replay the forward's random masks to match.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpfm_scale.models.config import BackboneConfig, HeadConfig, ModelConfig
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig

B, N_LOCAL, G, L, PATCH = 4, 2, 32, 16, 8
GRID = (G // PATCH) ** 2


def _model(grad_checkpointing: bool) -> SSLMetaArch:
    backbone = BackboneConfig(img_size=G, patch_size=PATCH, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.3,
                              grad_checkpointing=grad_checkpointing)
    head = HeadConfig(hidden_dim=48, bottleneck_dim=16, num_prototypes=64, expert_bottleneck_dim=16)
    torch.manual_seed(0)
    return SSLMetaArch(ObjectiveConfig(model=ModelConfig(backbone=backbone, head=head, experts=[]))).train()


def _batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(2 * B, GRID, generator=g) < 0.4
    n_i = masks.sum(-1)
    return {
        "global_crops": torch.randn(2 * B, 3, G, G, generator=g),
        "local_crops": torch.randn(N_LOCAL * B, 3, L, L, generator=g),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / n_i.clamp(min=1).float()).unsqueeze(-1).expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([int(masks.sum())]),
    }


def _count_block_runs(backbone: torch.nn.Module) -> list[int]:
    """A counter of block forward runs (wrapping `forward`: torch runs no forward hooks when it recomputes)."""
    calls = [0]
    for block in backbone.vit.blocks:
        def counted(x: Tensor, _forward=block.forward) -> Tensor:
            calls[0] += 1
            return _forward(x)
        block.forward = counted
    return calls


def _step(model: SSLMetaArch) -> tuple[dict[str, float], dict[str, Tensor], int]:
    """(loss terms, student gradients by name, student block calls) of one forward/backward from seed 7."""
    calls = _count_block_runs(model.student["backbone"])
    torch.manual_seed(7)  # drop-path masks
    logs = model.forward_backward(_batch(), None, teacher_temp=0.05)
    grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
    return logs, grads, calls[0]


def test_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_the_blocks() -> None:
    plain_logs, plain_grads, plain_calls = _step(_model(False))
    ckpt_model = _model(True)
    assert ckpt_model.student["backbone"].vit.grad_checkpointing
    ckpt_logs, ckpt_grads, ckpt_calls = _step(ckpt_model)
    assert plain_calls == 3 * 2  # 3 blocks x (global crops, local crops)
    assert ckpt_calls == 2 * plain_calls  # every block ran again in backward
    for term in ("total", "dino_global", "dino_local", "ibot", "koleo"):
        assert ckpt_logs[term] == plain_logs[term], term
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(float(g.abs().sum()) > 0 for n, g in ckpt_grads.items() if ".blocks." in n)


def test_the_teacher_runs_plainly_under_no_grad() -> None:
    model = _model(True)
    calls = _count_block_runs(model.teacher["backbone"])
    model.teacher_forward(_batch(), teacher_temp=0.05)
    assert calls[0] == 3
