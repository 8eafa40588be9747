"""Applying block-diagonal permutations to weights without building a dense ``d_in x d_in`` matrix."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_block_matrix", "apply_block_matrix_t", "permuted_masked_weight", "hard_permuted_masked_weight",
           "block_permute_scores"]


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


class _HardPermutedMask(torch.autograd.Function):
    """``((W P) * M) P^T`` for a hard ``P`` given as ``perm``: gathers forward, two batched matmuls backward.

    The value is ``W * M[:, argsort(perm)]``; the gradient with respect to ``P`` is the one autograd would
    give through the dense block products (``W^T ((G P) * M) + G^T ((W P) * M)`` per group), without
    materialising them in the forward pass.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, p: Tensor, perm: Tensor, mask_permuted: Tensor) -> Tensor:  # type: ignore[override]
        d_out, d_in = weight.shape
        groups, size = p.shape[0], p.shape[-1]
        masked = weight[:, perm] * mask_permuted.to(weight.dtype)  # (W P) * M
        out = torch.empty_like(weight)
        out[:, perm] = masked  # ... P^T
        ctx.save_for_backward(weight, perm, mask_permuted)
        ctx.shape = (d_out, groups, size)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, perm, mask = ctx.saved_tensors
        d_out, groups, size = ctx.shape
        mask = mask.to(grad.dtype)
        grad_perm = grad[:, perm]  # G P
        masked = weight[:, perm].to(grad.dtype) * mask  # (W P) * M
        w = weight.to(grad.dtype).reshape(d_out, groups, size)
        term1 = torch.einsum("ogi,ogj->gij", w, (grad_perm * mask).reshape(d_out, groups, size))
        term2 = torch.einsum("ogi,ogj->gij", grad.reshape(d_out, groups, size), masked.reshape(d_out, groups, size))
        return None, term1 + term2, None, None


def hard_permuted_masked_weight(weight: Tensor, p: Tensor, perm: Tensor, mask_permuted: Tensor) -> Tensor:
    """Same value and ``P``-gradient as :func:`permuted_masked_weight` when ``p`` is (in value) the permutation
    matrix of ``perm`` (e.g. a straight-through estimate), at the cost of gathers in the forward pass."""
    return _HardPermutedMask.apply(weight, p, perm, mask_permuted.detach())
