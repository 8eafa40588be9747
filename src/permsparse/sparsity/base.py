"""The pruner interface: a pruner turns a weight and its calibration statistics into an N:M mask.

Score-based pruners (magnitude, Wanda, RIA) only implement :meth:`Pruner.score`; the mask is the
N:M mask of the (optionally permuted) score. SparseGPT also rewrites the kept weights, so it
overrides :meth:`Pruner.prune`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from permsparse.sparsity.nm import NMPattern, nm_mask

__all__ = ["LayerStats", "PruneResult", "Pruner", "apply_perm_mask"]


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input ``X`` (tokens x d_in).

    ``sq_sum[j] = sum_t X[t, j]^2`` over all calibration tokens, ``count`` the number of tokens and,
    when collected, ``hessian = sum_t X[t]^T X[t]`` (d_in x d_in, unnormalised).
    """

    sq_sum: Tensor
    count: int
    hessian: Tensor | None = None

    @property
    def input_norm(self) -> Tensor:
        """``||X_j||_2`` over all calibration tokens, per input channel."""
        return self.sq_sum.clamp_min(0).sqrt()


@dataclass
class PruneResult:
    """A mask in the layer's original channel order and, if the pruner updates weights, the new weight."""

    mask: Tensor
    weight: Tensor | None = None


def apply_perm_mask(scores: Tensor, pattern: NMPattern, perm: Tensor | None, name: str = "tensor") -> Tensor:
    """N:M mask chosen on the permuted scores ``S[:, perm]``, mapped back to original order.

    This is ``M'[:, argsort(perm)]`` of docs/method.md §3: the same function as the deployed
    permuted layer, without moving any weight.
    """
    if perm is None:
        return nm_mask(scores, pattern, name)
    mask_perm = nm_mask(scores[:, perm], pattern, name)
    mask = torch.empty_like(mask_perm)
    mask[:, perm] = mask_perm
    return mask


class Pruner(ABC):
    """Interface of every mask generator. Subclasses set the class flags and implement ``score``."""

    #: needs per-input-channel statistics (``sq_sum``)
    needs_stats: bool = False
    #: needs the ``X^T X`` Hessian (SparseGPT)
    needs_hessian: bool = False
    #: rewrites the kept weights
    updates_weights: bool = False

    @abstractmethod
    def score(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """Importance score of every weight entry, same shape as ``weight``; higher is kept first."""

    def prune(
        self,
        weight: Tensor,
        stats: LayerStats | None,
        pattern: NMPattern,
        perm: Tensor | None = None,
        name: str = "tensor",
    ) -> PruneResult:
        """N:M mask in original channel order, chosen after permuting input channels by ``perm``."""
        return PruneResult(mask=apply_perm_mask(self.score(weight, stats), pattern, perm, name))

    def _require_stats(self, stats: LayerStats | None, hessian: bool = False) -> LayerStats:
        if stats is None:
            raise ValueError(f"{type(self).__name__} needs calibration statistics; run calibration first")
        if hessian and stats.hessian is None:
            raise ValueError(f"{type(self).__name__} needs the X^T X Hessian; calibrate with hessian=True")
        return stats
