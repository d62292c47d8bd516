"""KoLeo regulariser (Kozachenko-Leonenko entropy estimate, Sablayrolles et al. 2018): spread the CLS vectors.

loss = -mean_i log(max(d_i, eps)), with d_i the Euclidean distance from L2-normalised x_i to its nearest
other vector in the batch. Pathology batches often hold near-identical tiles (blank glass, pen marks): their
d_i -> 0 and -log d_i -> infinity, with a huge gradient pushing two copies of the same image apart. DINOv2
adds eps inside the log; here d_i is clamped at eps instead, which gives guarded samples a finite value AND no
gradient, and the number of guarded samples of the last call is kept in `num_guarded` for the trainer to log.

Computed per rank (not gathered), as in DINOv2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def nearest_neighbour_distances(x: Tensor) -> Tensor:
    """Distance of each row of L2-normalised x [B, D] to its nearest other row; returns [B].

    The neighbour is found by max inner product (diagonal excluded); the distance is the norm of the
    difference vector, which stays accurate for near-duplicates where sqrt(2 - 2 <x, y>) cancels in float32.
    """
    dots = x @ x.t()
    dots.fill_diagonal_(-2.0)  # below any cosine: a vector is never its own neighbour
    nearest = dots.argmax(dim=1)
    return (x - x[nearest]).norm(dim=-1)


class KoLeoLoss(nn.Module):
    """KoLeo loss on the student's global-crop CLS (backbone output, before the head)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.num_guarded = 0

    def forward(self, features: Tensor, num_chunks: int = 1) -> Tensor:
        """KoLeo of features [B, D] (float32 math), summed over `num_chunks` equal row chunks.

        DINOv2 applies KoLeo to each global crop separately (so the two crops of one image, which are
        near each other by design, are never neighbours) and SUMS the per-crop values: pass the [2B, D]
        global CLS with num_chunks=2 for that. Each chunk needs at least 2 rows.
        Sets `self.num_guarded` to the number of rows (all chunks) whose nearest distance was below eps.
        """
        if features.shape[0] % num_chunks or features.shape[0] // num_chunks < 2:
            raise ValueError(f"KoLeo needs >= 2 rows per chunk; got {features.shape[0]} rows in {num_chunks} chunks")
        total = features.new_zeros((), dtype=torch.float32)
        guarded = 0
        with torch.autocast(device_type=features.device.type, enabled=False):
            for chunk in features.float().chunk(num_chunks):
                distances = nearest_neighbour_distances(F.normalize(chunk, p=2, dim=-1, eps=self.eps))
                guarded += int((distances < self.eps).sum())
                total = total - torch.log(distances.clamp(min=self.eps)).mean()
        self.num_guarded = guarded
        return total
