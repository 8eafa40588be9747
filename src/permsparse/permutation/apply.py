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
    """``((W P) * M) P^T`` for a hard ``P`` given as ``perm``, with ``M P^T`` (the mask in original order) given.

    The value is ``W * (M P^T)``: one masked copy, no gathers of the weight. The gradient with respect to
    ``P`` is the one autograd gives through the dense block products, ``W^T ((G P) * M) + G^T ((W P) * M)``
    per group, computed as ``(W^T (G * M P^T) + G^T (W * M P^T)) P``: two batched matmuls in original order
    and a column permutation of the small ``(G, g, g)`` result, so neither ``W`` nor ``G`` is gathered.
    ``p``'s value is not read: it only carries that gradient (to a straight-through matrix, or to the
    Sinkhorn matrix behind one, which receives the same gradient).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, p: Tensor, local_perm: Tensor, mask_original: Tensor) -> Tensor:  # type: ignore[override]
        masked = weight * mask_original
        # the output is W * M P^T, which the backward needs as well: saving it costs no memory (the layer keeps it)
        ctx.save_for_backward(weight, local_perm, mask_original, masked)
        return masked

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, local, mask, masked = ctx.saved_tensors
        groups, size = local.shape
        d_out = weight.shape[0]
        w, mask, masked = weight.to(grad.dtype), mask.to(grad.dtype), masked.to(grad.dtype)

        def by_group(t: Tensor) -> Tensor:  # (d_out, d_in) -> (G, d_out, g), a view
            return t.reshape(d_out, groups, size).transpose(0, 1)

        # G * M P^T written straight into the (G, d_out, g) layout the batched matmul reads (a 0/1 float mask:
        # multiplying by a bool mask is ~20x slower on CPU)
        gm = torch.mul(by_group(grad), by_group(mask), out=grad.new_empty(groups, d_out, size))
        block = torch.bmm(by_group(w).transpose(1, 2), gm)
        block.baddbmm_(by_group(grad).transpose(1, 2), by_group(masked))
        # right-multiplying by the block permutation matrix: column j takes column local[j]
        return None, torch.gather(block, 2, local.unsqueeze(1).expand(groups, size, size)), None, None


def hard_permuted_masked_weight(weight: Tensor, p: Tensor, perm: Tensor, mask_permuted: Tensor | None = None,
                                mask_original: Tensor | None = None) -> Tensor:
    """Same value and ``P``-gradient as :func:`permuted_masked_weight` when ``p`` is (in value) the permutation
    matrix of ``perm`` (e.g. a straight-through estimate), at the cost of one masked copy in the forward pass.
    ``p``'s value is never read, so the Sinkhorn matrix behind a straight-through estimate may be passed
    instead: it receives the same gradient.

    Give the mask either in permuted order (``mask_permuted``, as chosen on the permuted scores) or, cheaper
    when it is reused across steps, already in original order (``mask_original = mask_permuted[:, argsort(perm)]``,
    best as 0/1 values in the weight's dtype).
    """
    groups, size = p.shape[0], p.shape[-1]
    perm = perm.to(weight.device)
    if mask_original is None:
        if mask_permuted is None:
            raise ValueError("hard_permuted_masked_weight needs mask_permuted or mask_original")
        mask_original = torch.empty_like(mask_permuted, dtype=weight.dtype)
        mask_original[:, perm] = mask_permuted.detach().to(weight.dtype)
    local = perm.reshape(groups, size) - torch.arange(groups, device=perm.device).unsqueeze(1) * size
    return _HardPermutedMask.apply(weight, p, local, mask_original.detach().to(weight.dtype))
