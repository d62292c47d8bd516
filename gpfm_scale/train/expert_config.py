"""Where the frozen expert teachers run: in the training worker's process, or in Ray actors on expert GPUs.

Remote mode (the default, DESIGN.md "Pretraining: what runs where"): every node that runs training workers also
holds `expert_gpus_per_node` expert actors, one per reserved accelerator, each serving a subset of the experts
(`assignment`). A worker sends its uint8 global crops to the actors of its own node and gets CLS and patch
targets back, pipelined one step ahead. In-process mode builds the experts on the worker's own device (one GPU,
or CPU tests) behind the same client interface.

Actors are placed lazily, per node, when the first training worker of that node asks (`expert_directory.py`), so a
worker group that Ray Train restarts on another node finds experts there; a dead actor restarts in its bundle
(`max_restarts`) and the client resubmits the request (`request_retries`).

`accelerator_resource` is the Ray resource one expert actor reserves: "GPU" on a real cluster (the actor then
sees exactly one CUDA device and computes in bf16), anything else (tests use a custom `test_gpu` resource) is a
stand-in: the actor reserves one unit of it and computes on CPU in fp32.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gpfm_scale.config import StrictModel
from gpfm_scale.errors import ConfigError

ExpertMode = Literal["in_process", "remote"]
ComputeDtype = Literal["auto", "bf16", "fp32"]
ReplyDtype = Literal["auto", "float16", "float32"]


class ExpertPlacementConfig(StrictModel):
    """How many expert actors per node, which experts each one holds, and what they reserve and compute in."""

    mode: ExpertMode = Field("remote", description="remote: Ray actors on expert GPUs; in_process: worker's device")
    expert_gpus_per_node: int = Field(1, ge=1, description="expert actors (one accelerator each) on every node")
    assignment: list[list[str]] | None = Field(
        None,
        description="expert names held by each expert GPU of a node, e.g. [[uni], [phikon, conch]]; "
        "null spreads the configured experts round-robin",
    )
    accelerator_resource: str = Field(
        "GPU", min_length=1, description="Ray resource each actor reserves; not GPU: a stand-in, computes on CPU"
    )
    cpus_per_actor: float = Field(1.0, ge=0.0, description="CPU slots each expert actor reserves")
    dtype: ComputeDtype = Field("auto", description="expert compute dtype; auto: bf16 on CUDA, fp32 on CPU")
    reply_dtype: ReplyDtype = Field(
        "auto",
        description="dtype of the returned tokens; auto: float16 after bf16 compute (half the bytes), else float32",
    )
    max_concurrency: int = Field(
        2, ge=1, description="requests one actor runs at once (threads): decode one while another computes"
    )
    prefetch_depth: int = Field(1, ge=1, description="expert requests in flight ahead of the step being computed")
    ready_timeout_s: float = Field(300.0, gt=0.0, description="s to reserve the bundles and load the experts")
    max_restarts: int = Field(
        -1, ge=-1, description="restarts of a dead expert actor in its bundle (-1: unlimited; they are stateless)"
    )
    request_retries: int = Field(
        3, ge=0, description="resubmissions of one request whose actor died, each after re-resolving the node's actors"
    )

    @model_validator(mode="after")
    def _assignment_fits(self) -> ExpertPlacementConfig:
        if self.assignment is None:
            return self
        if len(self.assignment) != self.expert_gpus_per_node:
            raise ValueError(
                f"assignment lists {len(self.assignment)} expert GPUs but expert_gpus_per_node is "
                f"{self.expert_gpus_per_node}"
            )
        if any(not held for held in self.assignment):
            raise ValueError("assignment: every expert GPU must hold at least one expert")
        names = [n for held in self.assignment for n in held]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"assignment: experts on more than one GPU: {', '.join(dupes)}")
        return self

    @property
    def on_cuda(self) -> bool:
        """True when the actors reserve real GPUs (and so compute on their CUDA device)."""
        return self.accelerator_resource == "GPU"


def resolve_assignment(expert_names: list[str], cfg: ExpertPlacementConfig) -> list[list[str]]:
    """The experts held by each of a node's expert actors: `cfg.assignment`, checked against the configured
    experts, or round-robin (expert i on actor i mod n). Raises ConfigError naming what does not fit."""
    if cfg.assignment is None:
        if cfg.expert_gpus_per_node > len(expert_names):
            raise ConfigError(
                f"expert_placement.expert_gpus_per_node: {cfg.expert_gpus_per_node} expert GPUs for "
                f"{len(expert_names)} experts would leave some GPUs without an expert"
            )
        n = cfg.expert_gpus_per_node
        return [expert_names[i::n] for i in range(n)]
    assigned = [name for held in cfg.assignment for name in held]
    unknown = sorted(set(assigned) - set(expert_names))
    missing = sorted(set(expert_names) - set(assigned))
    if unknown or missing:
        parts = [
            f"not configured experts: {', '.join(unknown)}" if unknown else "",
            f"experts on no GPU: {', '.join(missing)}" if missing else "",
        ]
        raise ConfigError("expert_placement.assignment: " + "; ".join(p for p in parts if p))
    return [list(held) for held in cfg.assignment]
