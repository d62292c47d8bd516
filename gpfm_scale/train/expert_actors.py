"""Expert teachers behind one client interface, in the worker's process or in Ray actors, pipelined a step ahead.

Data path of one request (remote mode): the worker's uint8 global crops [B, 3, H, W] go to the object store once
(`ray.put`, numpy: REFERENCE.md measured pickled torch tensors 3-5x slower through object refs) and every expert
actor of the worker's node reads them zero-copy (same node, shared memory). Each actor runs its experts (own
resize + normalisation, no_grad, bf16 autocast on CUDA), resamples patch tokens to the student grid and replies
with numpy arrays (float16 after bf16 compute: half the bytes) plus its own compute time, so the caller can split
its wait into transfer/queueing and compute. The client merges the replies into float32 tensors on its device
(on CUDA through pinned memory, a non-blocking copy, then the float32 cast on the GPU).

Failures: an actor that dies restarts in its bundle (stateless; `max_restarts`), and a request whose actor died is
resubmitted with the same crops (still in the object store) after the client re-resolves its node's actors, which
re-places them if they are gone for good; after `request_retries` resubmissions it fails with ExpertActorError.

`ExpertPrefetcher` issues the request for batch k+depth before handing out batch k, and a background thread
collects the replies (object-store read, merge, device copy), so the transfer, the expert forward and the reply
conversion of the next step overlap the student's current step; the wait it reports per step is what is left over.
Placement of the actors on the nodes is in `expert_placement.py` and `expert_directory.py`.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import ray
import torch

from gpfm_scale.data.batch_keys import GLOBAL_CROPS_UINT8
from gpfm_scale.errors import GpfmError
from gpfm_scale.models.config import ExpertConfig
from gpfm_scale.models.experts import Expert, build_expert
from gpfm_scale.train.expert_config import ComputeDtype, ReplyDtype

logger = logging.getLogger(__name__)

Grid = tuple[int, int]
Targets = dict[str, dict[str, torch.Tensor | None]]  # name -> {"cls": [B, D], "patch": [B, h * w, D] | None}
Stats = dict[str, float]
B = TypeVar("B")


class ExpertActorError(GpfmError):
    """An expert actor could not be reserved, started, found or merged (the message says which and where)."""


def autocast_dtype(dtype: ComputeDtype, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the expert forward, None for plain fp32 (auto: bf16 on CUDA only; REFERENCE.md
    measured bf16 8-10x slower than fp32 on these CPUs)."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def check_crops(crops: torch.Tensor) -> None:
    """Fail on the caller's side, before any transfer, when the crops are not uint8 [B, 3, H, W]."""
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"expert crops must be uint8 [B, 3, H, W], got {crops.dtype} {list(crops.shape)}")


def run_experts(
    experts: Mapping[str, Expert], crops: torch.Tensor, grid: Grid, device: torch.device, amp: torch.dtype | None
) -> dict[str, dict[str, torch.Tensor | None]]:
    """uint8 crops [B, 3, H, W] -> {name: {cls [B, D], patch [B, h * w, D] | None}} on `device` (the experts')."""
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return {name: expert(crops, tuple(grid)) for name, expert in experts.items()}


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over an array that may be read-only (object-store memory). Callers only read from it;
    torch warns about non-writable arrays because writing would be undefined."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _to_caller(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    """A reply array -> float32 tensor on the caller's device, never aliasing object-store memory. On CUDA the
    (float16) reply is staged in pinned memory and copied without blocking; the cast runs on the GPU."""
    if array is None:
        return None
    view = _readonly_tensor(array)
    if device.type == "cuda":
        return view.pin_memory().to(device, non_blocking=True).float()
    out = view.to(dtype=torch.float32)
    return out.clone() if out.data_ptr() == view.data_ptr() else out


def root_cause(err: BaseException) -> str:
    """Last line of a Ray error's text: the original exception, e.g. `CheckpointMismatchError: ... not found`."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else repr(err)


class ExpertServer:
    """Holds some experts on one device and answers forward requests; `ray.remote` is applied where it is created.

    Experts are built in `__init__` from `ExpertConfig`s, weights read from local paths on the actor's node, so a
    missing file fails the actor's creation with the loader's message (`place_expert_actors` reports it).
    """

    def __init__(
        self,
        expert_cfgs: Sequence[ExpertConfig],
        device: str = "cpu",
        dtype: ComputeDtype = "auto",
        reply_dtype: ReplyDtype = "auto",
    ) -> None:
        if not expert_cfgs:
            raise ValueError("an expert server needs at least one expert")
        self.device = torch.device(device)
        self.experts = {cfg.name: build_expert(cfg).to(self.device) for cfg in expert_cfgs}
        self.amp_dtype = autocast_dtype(dtype, self.device)
        half = reply_dtype == "float16" or (reply_dtype == "auto" and self.amp_dtype is not None)
        self.reply_dtype = torch.float16 if half else torch.float32
        logger.info("expert server pid %d: %s on %s", os.getpid(), ", ".join(self.experts), self.device)

    def describe(self) -> dict[str, Any]:
        """Where this server runs and what it holds: pid, Ray node id (None outside Ray), experts, device."""
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"pid": os.getpid(), "node_id": node_id, "experts": list(self.experts), "device": str(self.device)}

    def forward(self, crops: np.ndarray, grid: Grid) -> dict[str, Any]:
        """crops uint8 [B, 3, H, W] -> {"targets": {name: {"cls": [B, D], "patch": [B, h * w, D] | None}} as
        numpy (`reply_dtype`), "compute_s": seconds spent here, from receiving the array to the numpy reply}."""
        start = time.perf_counter()
        outputs = run_experts(self.experts, _readonly_tensor(crops), grid, self.device, self.amp_dtype)
        targets = {
            name: {k: None if v is None else v.to("cpu", self.reply_dtype).numpy() for k, v in out.items()}
            for name, out in outputs.items()
        }
        return {"targets": targets, "compute_s": time.perf_counter() - start}


class Pending(Protocol):
    """An expert request in flight."""

    def result(self, timeout_s: float | None = None) -> tuple[Targets, Stats]:
        """Block until the targets are there: (float32 targets on the caller's device, {"wait_s": seconds the
        caller was blocked on this request, submit included; "compute_s": expert compute seconds})."""
        ...


class ExpertClient(Protocol):
    """What a training worker calls, whatever runs the experts."""

    def submit(self, crops: torch.Tensor, grid: Grid) -> Pending:
        """Start computing targets for uint8 crops [B, 3, H, W] on the student's patch grid (h, w)."""
        ...


@dataclass
class _Done:
    """A request computed at submit time (in-process mode)."""

    targets: Targets
    stats: Stats

    def result(self, timeout_s: float | None = None) -> tuple[Targets, Stats]:
        return self.targets, self.stats


class InProcessExperts:
    """Experts on the caller's own device. `submit` computes at once: on one device there is nothing to overlap
    with, and on CUDA it synchronises so `wait_s` is the experts' real cost rather than hidden in the next step."""

    def __init__(
        self, expert_cfgs: Sequence[ExpertConfig], device: str | torch.device = "cpu", dtype: ComputeDtype = "auto"
    ) -> None:
        self.device = torch.device(device)
        self.experts = {cfg.name: build_expert(cfg).to(self.device) for cfg in expert_cfgs}
        self.amp_dtype = autocast_dtype(dtype, self.device)

    def submit(self, crops: torch.Tensor, grid: Grid) -> _Done:
        check_crops(crops)
        start = time.perf_counter()
        outputs = run_experts(self.experts, crops.to(self.device), grid, self.device, self.amp_dtype)
        targets = {n: {k: None if v is None else v.float() for k, v in o.items()} for n, o in outputs.items()}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        return _Done(targets, {"wait_s": elapsed, "compute_s": elapsed})


@dataclass
class _RemoteRequest:
    """Replies of every expert actor of the node to one request; the crops stay referenced for a resubmission."""

    client: RemoteExperts
    crops: ray.ObjectRef
    grid: Grid
    refs: list[ray.ObjectRef]
    submit_s: float

    def result(self, timeout_s: float | None = None) -> tuple[Targets, Stats]:
        start = time.perf_counter()
        replies = self._replies(timeout_s)
        targets: Targets = {}
        for reply in replies:
            for name, out in reply["targets"].items():
                if name in targets:
                    raise ExpertActorError(f"expert {name} answered by more than one actor")
                targets[name] = {k: _to_caller(v, self.client.device) for k, v in out.items()}
        wait_s = self.submit_s + time.perf_counter() - start
        return targets, {"wait_s": wait_s, "compute_s": max(r["compute_s"] for r in replies)}

    def _replies(self, timeout_s: float | None) -> list[dict[str, Any]]:
        """The replies; a dead actor (restarting, or gone with its node) -> resubmit to the re-resolved actors."""
        retries, retry = self.client.retries, 0
        while True:
            try:
                return ray.get(self.refs, timeout=timeout_s)
            except ray.exceptions.RayActorError as err:
                if retry == retries:
                    raise ExpertActorError(
                        f"expert request failed {retries + 1} times (expert_placement.request_retries: {retries}); "
                        f"last error: {type(err).__name__}: {root_cause(err)}"
                    ) from err
                retry += 1
                logger.warning("expert request failed (%s): resubmitting, retry %d of %d", root_cause(err), retry,
                               retries)
                self.refs = self.client.resend(self.crops, self.grid)


class RemoteExperts:
    """Fans each request out to the expert actors of this worker's node (each holds a subset of the experts) and
    merges their replies. The crops are put in the object store once and shared by all the actors.

    `resolve()` returns the node's actor handles (asking the expert directory, which places them on first use and
    re-places dead ones); it is called again before each resubmission of a request whose actor died.
    """

    def __init__(
        self, resolve: Callable[[], Sequence[Any]], device: str | torch.device = "cpu", retries: int = 3
    ) -> None:
        self.resolve = resolve
        self.device = torch.device(device)
        self.retries = retries
        self.actors = self._connect()

    def _connect(self) -> list[Any]:
        actors = list(self.resolve())
        if not actors:
            raise ExpertActorError("RemoteExperts needs at least one expert actor")
        return actors

    def _send(self, crops: ray.ObjectRef, grid: Grid) -> list[ray.ObjectRef]:
        return [actor.forward.remote(crops, grid) for actor in self.actors]

    def submit(self, crops: torch.Tensor, grid: Grid) -> _RemoteRequest:
        check_crops(crops)
        start = time.perf_counter()
        ref = ray.put(np.ascontiguousarray(crops.detach().cpu().numpy()))
        grid = (int(grid[0]), int(grid[1]))
        return _RemoteRequest(self, ref, grid, self._send(ref, grid), time.perf_counter() - start)

    def resend(self, crops: ray.ObjectRef, grid: Grid) -> list[ray.ObjectRef]:
        """Re-resolve the node's actors and send them the same crops again (called from the reply thread)."""
        self.actors = self._connect()
        return self._send(crops, grid)

    def describe(self) -> list[dict[str, Any]]:
        """Each actor's pid, node id, experts and device."""
        return ray.get([actor.describe.remote() for actor in self.actors])


class ExpertStep(NamedTuple, Generic[B]):
    """One training step's input: the batch, its expert targets, and where the time went (s)."""

    batch: B
    targets: Targets
    stats: Stats  # wait_s (blocked on experts), compute_s (expert compute), data_wait_s (blocked on the loader)


class ExpertPrefetcher(Generic[B]):
    """Iterate `batches` with their expert targets, keeping `depth` requests in flight ahead of the step.

    Before batch k is handed out, the request for batch k + depth has been submitted and its collection queued on
    the reply thread, so its transfer, expert forward and reply conversion run while the caller computes step k.
    Per step, `wait_s` is the time blocked on expert work in this iteration (submitting k + depth, then waiting
    for k's collected replies): near zero when the experts keep up. Pulling batches ahead also moves the loader's
    wait into this iterator: it is reported as `data_wait_s`.
    """

    def __init__(
        self,
        batches: Iterable[B],
        client: ExpertClient,
        grid: Grid,
        crops: str | Callable[[B], torch.Tensor] = GLOBAL_CROPS_UINT8,
        depth: int = 1,
    ) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.batches = batches
        self.client = client
        self.grid: Grid = (int(grid[0]), int(grid[1]))
        self.crops_of = crops if callable(crops) else (lambda batch: batch[crops])
        self.depth = depth

    def _issue(
        self, source: Iterator[B], in_flight: deque[tuple[B, Future]], replies: ThreadPoolExecutor
    ) -> tuple[float, float]:
        """Pull one batch, submit its request and queue its collection; (loader s, submit s), (t, 0) at the end."""
        start = time.perf_counter()
        batch = next(source, _END)
        pulled = time.perf_counter()
        if batch is _END:
            return pulled - start, 0.0
        pending = self.client.submit(self.crops_of(batch), self.grid)
        in_flight.append((batch, replies.submit(pending.result)))
        return pulled - start, time.perf_counter() - pulled

    def __iter__(self) -> Iterator[ExpertStep[B]]:
        source = iter(self.batches)
        in_flight: deque[tuple[B, Future]] = deque()
        # One thread, so replies are collected in submission order while the caller computes its step.
        replies = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-replies")
        try:
            data_s, submit_s = 0.0, 0.0
            for _ in range(self.depth):
                pulled, submitted = self._issue(source, in_flight, replies)
                data_s, submit_s = data_s + pulled, submit_s + submitted
            while in_flight:
                batch, collected = in_flight.popleft()
                pulled, submitted = self._issue(source, in_flight, replies)
                start = time.perf_counter()
                targets, req = collected.result()
                wait_s = submit_s + submitted + time.perf_counter() - start
                stats = {"wait_s": wait_s, "compute_s": req["compute_s"], "data_wait_s": data_s + pulled}
                data_s, submit_s = 0.0, 0.0
                yield ExpertStep(batch, targets, stats)
        finally:
            replies.shutdown(wait=False, cancel_futures=True)


_END: Any = object()
