"""Frozen expert teachers for knowledge distillation: the interface, the registry and its entries.

Importing this package registers every entry in `EXPERTS`: the real `uni`, `phikon`, `conch` (weights from local
files only; nothing is fetched at run time) and the random-init `tiny_a`, `tiny_b` used by tests.
"""

from gpfm_scale.models.experts import conch, phikon, tiny, uni
from gpfm_scale.models.experts.base import (
    EXPERTS,
    Expert,
    ExpertSpec,
    build_expert,
)

__all__ = ["EXPERTS", "Expert", "ExpertSpec", "build_expert", "conch", "phikon", "tiny", "uni"]
