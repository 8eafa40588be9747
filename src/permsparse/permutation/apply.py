"""Applying block-diagonal permutations to weights without building a dense ``d_in x d_in`` matrix."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_block_matrix", "apply_block_matrix_t", "permuted_masked_weight", "block_permute_scores"]


def _blocks(weight: Tensor, groups: int) -> Tensor:
    d_out, d_in = weight.shape
    if d_in % groups:
        raise ValueError(f"d_in={d_in} is not divisible by groups={groups}")
    return weight.reshape(d_out, groups, d_in // groups)


def apply_block_matrix(weight: Tensor, p: Tensor) -> Tensor:
    """``W @ blockdiag(P_1..P_G)`` as one batched matmul; ``p`` is ``(G, g, g)``."""
    out = torch.einsum("ogi,gij->ogj", _blocks(weight, p.shape[0]), p)
    return out.reshape(weight.shape)


def apply_block_matrix_t(weight: Tensor, p: Tensor) -> Tensor:
    """``W @ blockdiag(P_1..P_G)^T``: undoes :func:`apply_block_matrix` for a permutation matrix."""
    out = torch.einsum("ogj,gij->ogi", _blocks(weight, p.shape[0]), p)
    return out.reshape(weight.shape)


def permuted_masked_weight(weight: Tensor, p: Tensor, mask_permuted: Tensor) -> Tensor:
    """``((W P) * M) P^T`` of METHOD.md section 4.4: the masked weight back in original channel order.

    With a hard ``P`` (possibly carrying a straight-through gradient) this equals ``W * M[:, argsort(perm)]``
    in value, while the gradient reaches ``P``. ``mask_permuted`` is treated as a constant.
    """
    wp = apply_block_matrix(weight, p)
    return apply_block_matrix_t(wp * mask_permuted.detach().to(wp.dtype), p)


def block_permute_scores(scores: Tensor, p: Tensor) -> Tensor:
    """Scores in permuted order (``S P``), detached, for choosing the N:M mask."""
    with torch.no_grad():
        return apply_block_matrix(scores, p.detach().to(scores.dtype))
