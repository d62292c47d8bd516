"""Two gloo ranks holding different numbers of rows give the same teacher targets and centers as one process
holding all of them: the all-reduces in Sinkhorn-Knopp and the center EMA are exact, not per-rank averages."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpfm_scale.models.losses import DinoClsLoss, IbotPatchLoss

WORLD = 2
K = 4


def _all_logits() -> torch.Tensor:
    return torch.randn(8, K, generator=torch.Generator().manual_seed(0)) * 2


def _check_split(rank: int, split: int) -> None:
    """Rank 0 holds rows [:split], rank 1 rows [split:]; compare with the single-process result."""
    logits = _all_logits()
    rows = slice(0, split) if rank == 0 else slice(split, None)
    local = logits[rows]
    expected_q = _single_process(lambda: DinoClsLoss(K).sinkhorn_knopp_teacher(logits, 0.1))[rows]
    dino = DinoClsLoss(K)
    torch.testing.assert_close(dino.sinkhorn_knopp_teacher(local, 0.1), expected_q)
    ibot = IbotPatchLoss(K)
    n_local = torch.tensor(float(local.shape[0]))
    torch.testing.assert_close(ibot.sinkhorn_knopp_teacher(local, 0.1, n_masked_patches=n_local), expected_q)
    dino.update_center(local)
    torch.testing.assert_close(dino.center, 0.1 * logits.mean(dim=0, keepdim=True))


def _single_process(fn):  # type: ignore[no-untyped-def]
    """Run fn as if torch.distributed were not initialised (the loss helpers check `is_initialized`)."""
    original = dist.is_initialized
    dist.is_initialized = lambda: False  # type: ignore[assignment]
    try:
        return fn()
    finally:
        dist.is_initialized = original  # type: ignore[assignment]


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check_split(rank, split=3)  # 3 rows vs 5 rows
        _check_split(rank, split=0)  # rank 0 holds no rows at all
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"),), nprocs=WORLD, join=True)
