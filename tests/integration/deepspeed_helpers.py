"""In-process DeepSpeed for the teacher and clipping tests: a one-rank gloo group and a tiny SSLMetaArch engine.

One rank is enough to exercise each stage's own code paths (bf16 casting, ZeRO-1/2 fp32 master partitions and
gradient fragments, ZeRO-3 parameter and gradient partitions) without spawning processes or Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from gpfm_scale.models.config import BackboneConfig, ExpertConfig, HeadConfig, ModelConfig
from gpfm_scale.models.meta_arch import SSLMetaArch
from gpfm_scale.models.objective_config import ObjectiveConfig
from tests.ports import free_port

B, G, PATCH = 2, 16, 8
GRID = (G // PATCH) ** 2
TEACHER_TEMP = 0.05


_PORT: list[int] = []  # the one group's port, chosen at its creation


@contextmanager
def single_rank_group() -> Iterator[None]:
    """torch.distributed with one gloo rank (what DeepSpeed needs) and its env, restored afterwards.

    The group itself is created once per process and kept: DeepSpeed caches the process groups it first sees,
    so destroying it and creating another breaks the next engine ("Group ... is not registered"). No other
    test initialises torch.distributed in the pytest process (multi-rank tests spawn their own processes)."""
    if not _PORT:
        _PORT.append(free_port())
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_PORT[0]), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tiny_model(experts: bool, seed: int = 0) -> SSLMetaArch:
    """A 2-block ViT (dim 16) with DINO head, and expert `tiny_a` (a projection head) when `experts`."""
    backbone = BackboneConfig(img_size=G, patch_size=PATCH, embed_dim=16, depth=2, num_heads=2, drop_path_rate=0.0,
                              layerscale_init=1.0)
    head = HeadConfig(hidden_dim=24, bottleneck_dim=8, num_prototypes=32, expert_bottleneck_dim=8)
    chosen = [ExpertConfig(name="tiny_a", cls_weight=1.0, patch_weight=None)] if experts else []
    torch.manual_seed(seed)
    return SSLMetaArch(ObjectiveConfig(model=ModelConfig(backbone=backbone, head=head, experts=chosen))).train()


def tiny_batch(seed: int, experts: bool) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(collate-shaped batch with a few masked patches, expert targets or None)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2 * B, GRID, dtype=torch.bool)
    masks[0, :2] = masks[3, 1] = True
    n_i = masks.sum(-1)
    batch = {
        "global_crops": torch.randn(2 * B, 3, G, G, generator=g),
        "local_crops": torch.randn(2 * B, 3, PATCH, PATCH, generator=g),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / n_i.clamp(min=1).float()).unsqueeze(-1).expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([int(masks.sum())]),
    }
    targets = {"tiny_a": {"cls": torch.randn(2 * B, 48, generator=g), "patch": None}} if experts else None
    return batch, targets


def build_engine(model: SSLMetaArch, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine
