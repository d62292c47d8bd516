"""Every setting of the embedding stage, with its default. YAML files and CLI options only state differences.

Resources: the model runs in a pool of `num_actors` Ray Data actors (one GPU each when the cluster has GPUs);
reading, decoding and resizing run as Ray Data tasks beside them. On a CPU-only node the actors and the read tasks
share the CPUs: Ray Data can wait forever, silently, when the actors hold every CPU slot and no read task can be
scheduled (measured on 2-CPU machines, REFERENCE.md field notes), so the stage refuses a plan that leaves less than
`cpus_per_read_task` free, and the automatic plan never makes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from gpfm_scale.config import DriverSettings

InputKind = Literal["auto", "tiles", "slides", "images"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class EmbedConfig(DriverSettings):
    """The driver settings (Ray address, metrics endpoint, resource wait) are the run's, once: the tiling of a
    slide manifest runs under them too (`gpfm_scale.embed_command`)."""

    batch_size: int = Field(default=256, ge=1, description="Images per forward pass of an inference actor.")
    num_actors: int | None = Field(
        default=None, ge=1,
        description="Inference actors; default: one per GPU, else half the CPUs left after one read slot (>= 1).")
    cpus_per_actor: float = Field(
        default=1.0, gt=0, description="Logical CPUs reserved per inference actor (fractions allowed).")
    gpus_per_actor: float | None = Field(
        default=None, ge=0, description="GPUs per inference actor; default: 1 when the cluster has GPUs, else 0.")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per CPU actor; default: max(1, cpus_per_actor).")
    read_tasks: int | None = Field(
        default=None, ge=1, description="Concurrent read/decode tasks; default: Ray Data's choice (free CPUs).")
    cpus_per_read_task: float = Field(default=1.0, gt=0, description="Logical CPUs per read/decode task.")
    wait_for_actors_s: int | None = Field(
        default=None, gt=0,
        description="Start reading only once every inference actor has built its model (waiting at most this many "
                    "seconds); default: read while the actors start (decoded tiles queue in the object store).")
    read_task_memory_bytes: int = Field(
        default=2**30, gt=0,
        description="Memory reserved per read task; it also keeps Ray Data from fusing decoding into the actors.")
    decode_batch: int = Field(
        default=256, ge=1, description="Decoded images per block a read task emits (bounds task memory).")
    images_per_task: int = Field(
        default=512, ge=1, description="Image-folder files per read task.")
    dtype: DType = Field(
        default="auto", description="Inference precision: auto = bfloat16 autocast on GPU, float32 on CPU.")
    feature_dtype: Literal["float16", "float32"] = Field(
        default="float16",
        description="Stored feature precision: float16 halves the disk; float32 keeps features that barely vary "
                    "across images apart (float16 resolves ~1e-3 of a value: a random-init model with LayerScale "
                    "1e-5 falls below it).")
    weights: Path | None = Field(
        default=None, description="Local weight file for expert:NAME or timm:NAME (never downloaded).")
    allow_random_init: bool = Field(
        default=False, description="Let timm:NAME run without weights (random init): only for tests and baselines.")
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra timm.create_model arguments for timm:NAME (e.g. img_size).")
    input_kind: InputKind = Field(
        default="auto", description="What --input is: tiles (tiler output or shards), slides (a slide manifest or "
                                    "folder, tiled first into OUT/tiles), images (class folders); auto detects.")
    max_corrupt_fraction: float = Field(
        default=0.05, ge=0, le=1,
        description="A slide with more undecodable tiles than this fraction fails; below it the good tiles are "
                    "embedded and the count recorded (n_corrupt). Corrupt tiles are never replaced.")
