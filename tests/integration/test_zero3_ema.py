"""Under ZeRO-3 the teacher's EMA runs on each rank's parameter slices and still equals the formula.

Two gloo ranks (spawned processes), a tiny SSLMetaArch under DeepSpeed ZeRO-3 (teacher and student partitioned),
one optimiser step, then `ema_update` on the slices. The gathered teacher must equal m * teacher_before +
(1 - m) * student_after for every parameter.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from gpfm_scale.config import apply_overrides, build_config, read_yaml
from tests.integration.pretrain_helpers import TINY_YAML

MOMENTUM = 0.9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    from gpfm_scale.models.meta_arch import SSLMetaArch
    from gpfm_scale.models.objective_config import ObjectiveConfig
    from gpfm_scale.train.engine import DeepSpeedConfig, deepspeed_config, ema_update, gathered, is_partitioned

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    cfg = build_config(ObjectiveConfig, apply_overrides(read_yaml(TINY_YAML)["objective"], {"model.experts": []}))
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    student = [p for p in model.student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(student, lr=1e-2)
    ds = deepspeed_config(DeepSpeedConfig(zero_stage=3), 2, 3.0, False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    pairs = [(t, s) for _, t, s in model.teacher_student_param_pairs()]
    assert all(is_partitioned(t) and is_partitioned(s) for t, s in pairs)
    params = [p for pair in pairs for p in pair]
    for _, s in pairs:  # move the student's slices, as an optimiser step would, so that teacher and student differ
        s.ds_tensor.add_(torch.randn_like(s.ds_tensor) * 0.1)
    with gathered(params):
        before = [(t.detach().clone(), s.detach().clone()) for t, s in pairs]
    ema_update(pairs, MOMENTUM)
    with gathered(params):
        after = [t.detach().clone() for t, _ in pairs]
    worst = max(float((a - (MOMENTUM * t + (1 - MOMENTUM) * s)).abs().max()) for a, (t, s) in zip(after, before))
    moved = max(float((a - t).abs().max()) for a, (t, _) in zip(after, before))
    results[rank] = (worst, moved, len(pairs))
    del engine
    torch.distributed.destroy_process_group()


def test_zero3_ema_on_slices_equals_the_formula():
    port = _free_port()
    # spawn, not the default fork: a forked copy of this process (the test session's Ray driver) broke the
    # driver's connection to Ray's GCS, and every later actor creation in the session hung.
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(port, results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        worst, moved, n = results[rank]
        assert n > 10 and moved > 1e-3  # the teacher did move
        assert worst < 1e-6
