"""Score-based mask generators: magnitude, Wanda and RIA (docs/method.md §2).

Each pruner only defines :meth:`score`; :meth:`Pruner.prune` turns the (optionally permuted) score
into an N:M mask. Scores are computed in at least float32 so half-precision weights neither
overflow nor create spurious ties.
"""

from __future__ import annotations

import torch
from torch import Tensor

from permsparse.sparsity.base import LayerStats, Pruner

__all__ = ["MagnitudePruner", "WandaPruner", "RIAPruner"]

#: added to denominators of normalised scores so that all-zero rows/columns give 0, not NaN
_EPS = 1e-12


def _score_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def input_norm_for(weight: Tensor, stats: LayerStats, owner: str) -> Tensor:
    """``||X_j||_2`` of ``stats`` as a ``(1, d_in)`` row on ``weight``'s device, checked against ``weight``."""
    if weight.dim() != 2:
        raise ValueError(f"{owner}: expected a 2-D weight (d_out, d_in), got shape {tuple(weight.shape)}")
    norm = stats.input_norm
    if norm.dim() != 1 or norm.shape[0] != weight.shape[1]:
        raise ValueError(
            f"{owner}: statistics have {tuple(norm.shape)} input channels but the weight has d_in={weight.shape[1]}"
        )
    return norm.to(device=weight.device, dtype=_score_dtype(weight)).unsqueeze(0)


class MagnitudePruner(Pruner):
    """Keep the largest ``|W_ij|``; needs no calibration data."""

    needs_stats = False
    needs_hessian = False
    updates_weights = False

    def score(self, weight: Tensor, stats: LayerStats | None = None) -> Tensor:
        """``|W_ij|``."""
        return weight.detach().to(_score_dtype(weight)).abs()


class WandaPruner(Pruner):
    """Wanda (Sun et al., 2024): ``|W_ij| * ||X_j||_2``."""

    needs_stats = True
    needs_hessian = False
    updates_weights = False

    def score(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """``|W_ij| * ||X_j||_2`` with ``||X_j||_2`` over all calibration tokens."""
        stats = self._require_stats(stats)
        return weight.detach().to(_score_dtype(weight)).abs() * input_norm_for(weight, stats, "wanda")


class RIAPruner(Pruner):
    """RIA (Zhang et al., ICLR 2024): relative importance times input-norm activation.

    ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2 ** a``: the first term divides by
    the column sum (over output rows), the second by the row sum (over input channels).
    """

    needs_stats = True
    needs_hessian = False
    updates_weights = False

    def __init__(self, a: float = 0.5) -> None:
        self.a = float(a)

    def score(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """RIA score; zero column or row sums are guarded by a tiny eps so they score 0, never NaN."""
        stats = self._require_stats(stats)
        w = weight.detach().to(_score_dtype(weight)).abs()
        col_sum = w.sum(dim=0, keepdim=True)  # sum over output rows i, one per input channel j
        row_sum = w.sum(dim=1, keepdim=True)  # sum over input channels j, one per output row i
        relative = w / (col_sum + _EPS) + w / (row_sum + _EPS)
        return relative * input_norm_for(weight, stats, "ria").pow(self.a)

    def __repr__(self) -> str:
        return f"RIAPruner(a={self.a})"
