"""The weighted sum of loss terms, with the list of terms that enter written down, not implied.

Total = dino_local + dino_global + 0.1 * koleo + ibot + sum_e (w_cls_e * expert/e/cls + w_patch_e * expert/e/patch)

`weighted_total` requires a weight for every term it is given and a term for every positive weight, so a
term computed but forgotten, or a weight configured but never fed, is an error instead of a silent change of
objective. Terms whose weight is 0 are left out of the sum entirely (not multiplied by 0), so a disabled
term that is NaN cannot poison the total.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field
from torch import Tensor

from gpfm_scale.config import StrictModel


class LossWeights(StrictModel):
    """Weights of the self-supervised terms (expert weights live with each expert: `ExpertLossWeights`)."""

    dino_local: float = Field(1.0, ge=0.0)
    dino_global: float = Field(1.0, ge=0.0)
    koleo: float = Field(0.1, ge=0.0)
    ibot: float = Field(1.0, ge=0.0)

    def as_mapping(self) -> dict[str, float]:
        """Term name -> weight; the names match the keys the losses return."""
        return dict(self.model_dump())


def weighted_total(terms: Mapping[str, Tensor], weights: LossWeights | Mapping[str, float]) -> Tensor:
    """sum_name weights[name] * terms[name] over names with a positive weight.

    Raises KeyError naming the mismatch when a term has no weight or a positive weight has no term.
    Typical call: weighted_total(terms, {**loss_weights.as_mapping(), **expert_loss.term_weights}).
    """
    weight_map = weights.as_mapping() if isinstance(weights, LossWeights) else dict(weights)
    unweighted = sorted(set(terms) - set(weight_map))
    if unweighted:
        raise KeyError(f"loss terms without a weight: {unweighted}")
    missing = sorted(name for name, w in weight_map.items() if w > 0 and name not in terms)
    if missing:
        raise KeyError(f"weighted loss terms not computed: {missing}")
    entering = [name for name in sorted(terms) if weight_map[name] > 0]
    if not entering:
        raise ValueError("no loss term has a positive weight")
    total = weight_map[entering[0]] * terms[entering[0]]
    for name in entering[1:]:
        total = total + weight_map[name] * terms[name]
    return total
