"""Applying block-diagonal permutations to weights without building a dense ``d_in x d_in`` matrix."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_block_matrix", "apply_block_matrix_t", "permuted_masked_weight", "hard_permuted_masked_weight",
           "block_permute_scores", "gradient_workspace", "native_bf16_matmul", "soft_mask_gradient", "soft_top_n_grad_p"]


def native_bf16_matmul(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on ``device``: a CPU with AVX512-BF16 or AMX tiles.
    On CUDA this answers False, so ``grad_precision=auto`` stays in fp32 there: the workspace costs 4 bytes per
    weight, memory a large model on a GPU may not have to spare (``bfloat16`` asks for it explicitly)."""
    if torch.device(device).type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


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
    """``((W P) * M) P^T`` of docs/method.md §4.4: the masked weight back in original channel order.

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
    """``((W P) * M) P^T`` for a hard ``P`` given as ``perm``, with ``M P^T`` (the mask in original order) given,
    all in transposed layout: it takes ``W^T`` and ``(M P^T)^T`` and returns ``(W * M P^T)^T``, each ``(d_in, d_out)``.

    The value is ``W * (M P^T)``: one masked copy, no gathers of the weight. The gradient with respect to
    ``P`` is the one autograd gives through the dense block products, ``W^T ((G P) * M) + G^T ((W P) * M)``
    per group, computed as ``(W^T (G * M P^T) + G^T (W * M P^T)) P``: two batched matmuls in original order
    and a column permutation of the small ``(G, g, g)`` result, so neither ``W`` nor ``G`` is gathered.
    ``p``'s value is not read: it only carries that gradient (to a straight-through matrix, or to the
    Sinkhorn matrix behind one, which receives the same gradient).

    Why transposed: a group's block of input channels is then a contiguous ``(g, d_out)`` slab, so the batched
    matmuls read ``(G, g, d_out)`` views without copies, the product ``G * M P^T`` is written contiguously, and a
    mask update rewrites whole rows (a changed channel) instead of scattering columns (several times slower;
    ``scripts/bench_machinery.py``). A linear layer consumes the transposed result (``x @ W_eff^T``) as it is, and hands back ``G^T``
    contiguous.

    With a ``workspace`` (:func:`gradient_workspace`) the two products run as one low-precision matmul with fp32
    accumulation, ``[W | G]^T [G * M P^T | W * M P^T]`` per group, whose result is rounded once to the workspace's
    dtype (bf16: about 0.4 % relative error per entry of the ``P``-gradient). The ``W`` half of the workspace is
    filled once (the weight is frozen); each backward writes ``G`` into the other half.
    """

    @staticmethod
    def forward(ctx, weight_t: Tensor, p: Tensor, local_perm: Tensor, mask_t: Tensor,  # type: ignore[override]
                workspace: Tensor | None, base: Tensor | None = None) -> Tensor:
        masked_t = weight_t * mask_t
        # the output is (W * M P^T)^T, which the backward needs as well: saving it costs no memory (the layer keeps it)
        ctx.save_for_backward(weight_t, local_perm, mask_t, masked_t, base)
        ctx.workspace = workspace
        return masked_t

    @staticmethod
    def backward(ctx, grad_t: Tensor):  # type: ignore[override]
        weight_t, local, mask_t, masked_t, base = ctx.saved_tensors
        groups, size = local.shape
        d_out = weight_t.shape[1]

        def by_group(t: Tensor) -> Tensor:  # (d_in, d_out) -> (G, g, d_out): a view when t is contiguous
            t = t if base is None else t.index_select(0, base)  # the channels in the frame's order
            return t.to(grad_t.dtype).reshape(groups, size, d_out)

        workspace = ctx.workspace
        if workspace is None:
            # (G * M P^T)^T by group (a 0/1 float mask: multiplying by a bool mask is ~20x slower on CPU)
            gm = by_group(grad_t) * by_group(mask_t)
            block = torch.bmm(by_group(weight_t), gm.transpose(1, 2))  # W^T (G * M P^T), per group
            block.baddbmm_(by_group(grad_t), by_group(masked_t).transpose(1, 2))  # + G^T (W * M P^T)
        else:  # [W | G] x [G * M P^T | W * M P^T]^T: both products in one low-precision matmul
            workspace[..., d_out:].copy_(by_group(grad_t))
            rhs = workspace.new_empty(workspace.shape)
            torch.mul(by_group(grad_t), by_group(mask_t), out=rhs[..., :d_out])
            rhs[..., d_out:].copy_(by_group(masked_t))
            block = torch.bmm(workspace, rhs.transpose(1, 2)).to(grad_t.dtype)
        # right-multiplying by the block permutation matrix: column j takes column local[j]
        return None, torch.gather(block, 2, local.unsqueeze(1).expand(groups, size, size)), None, None, None, None


def gradient_workspace(weight: Tensor, groups: int, dtype: torch.dtype = torch.bfloat16,
                       base: Tensor | None = None) -> Tensor:
    """The ``(G, g, 2 d_out)`` buffer that makes :func:`hard_permuted_masked_weight` compute the ``P``-gradient
    as one ``dtype`` matmul: ``W^T`` by group in the first half (so ``weight`` must stay unchanged while the
    workspace is in use), room for the incoming gradient in the second. On a CPU with native bf16 dot products
    (AVX512-BF16, AMX) a bf16 matmul runs at about twice the fp32 rate (measured by ``scripts/bench_machinery.py``,
    recorded in ``results/benchmarks/``). Memory: the weight's size in fp32 (4 bytes per weight). ``base``: the
    frame of :func:`hard_permuted_masked_weight` (the weight's channels are stored in that order)."""
    d_out, d_in = weight.shape
    if d_in % groups:
        raise ValueError(f"d_in={d_in} is not divisible by groups={groups}")
    workspace = torch.empty(groups, d_in // groups, 2 * d_out, dtype=dtype, device=weight.device)
    weight_t = weight.detach().T if base is None else weight.detach().T.index_select(0, base.to(weight.device))
    workspace[..., :d_out].copy_(weight_t.reshape(groups, d_in // groups, d_out))
    return workspace


def hard_permuted_masked_weight(weight: Tensor, p: Tensor, perm: Tensor, mask_permuted: Tensor | None = None,
                                mask_original: Tensor | None = None, workspace: Tensor | None = None,
                                base: Tensor | None = None) -> Tensor:
    """Same value and ``P``-gradient as :func:`permuted_masked_weight` when ``p`` is (in value) the permutation
    matrix of ``perm`` (e.g. a straight-through estimate), at the cost of one masked copy in the forward pass.
    ``p``'s value is never read, so the Sinkhorn matrix behind a straight-through estimate may be passed
    instead: it receives the same gradient.

    Give the mask either in permuted order (``mask_permuted``, as chosen on the permuted scores) or, cheaper
    when it is reused across steps, already in original order (``mask_original = mask_permuted[:, argsort(perm)]``,
    best as 0/1 values in the weight's dtype). Fastest when ``weight`` and ``mask_original`` are stored transposed
    (``t.T.is_contiguous()``, as :class:`~permsparse.permutation.learned.LearnedPermutations` lays them out); the
    result is then a transposed view too, which a linear layer reads without a copy. Any layout gives the same values.

    ``workspace``: a :func:`gradient_workspace` of ``weight`` to compute the ``P``-gradient in its (lower) precision.

    ``base``: a fixed ``(d_in,)`` permutation that defines the frame the blocks live in (``perm.method.base``): the
    blocks of ``p`` are then contiguous runs of ``base``'s order rather than of the original channel order, the whole
    permutation is ``base[perm]``, and ``perm`` is the block-diagonal part, in the frame. ``mask_original`` (or
    ``mask_permuted``, chosen on the scores in the order ``base[perm]``) is the mask of that whole permutation; the
    backward pass gathers the channels into the frame (one row gather per tensor); the workspace, if any, must be
    built with the same ``base``.
    """
    groups, size = p.shape[0], p.shape[-1]
    perm = perm.to(weight.device)
    base = None if base is None else base.to(weight.device)
    if mask_original is None:
        if mask_permuted is None:
            raise ValueError("hard_permuted_masked_weight needs mask_permuted or mask_original")
        mask_original = torch.empty_like(mask_permuted, dtype=weight.dtype)
        mask_original[:, perm if base is None else base[perm]] = mask_permuted.detach().to(weight.dtype)
    local = perm.reshape(groups, size) - torch.arange(groups, device=perm.device).unsqueeze(1) * size
    if workspace is not None and workspace.shape != (groups, size, 2 * weight.shape[0]):
        raise ValueError(f"gradient workspace of shape {tuple(workspace.shape)} does not fit a {tuple(weight.shape)} "
                         f"weight in {groups} groups; build it with gradient_workspace(weight, {groups})")
    return _HardPermutedMask.apply(weight.T, p, local, mask_original.detach().to(weight.dtype).T, workspace, base).T


class _SoftMaskGradient(torch.autograd.Function):
    """Identity on the masked weight in the forward pass; in the backward pass, beside passing the weight's
    gradient through, the gradient a straight-through *soft* N:M mask gives ``P``.

    The mask the forward pass uses is the hard top-N of every M-group of the permuted scores ``S P``. Its soft
    stand-in is ``N * softmax(S P / t)`` over each M-group (a soft top-N), and ``M = M_hard + M_soft -
    stop_gradient(M_soft)``: the value stays the hard mask, the gradient flows through ``M_soft``. With ``G`` the
    gradient of the masked weight, ``dL/dM = (G * W)[:, perm]`` (permuted order), the softmax Jacobian gives
    ``dL/d(S P)``, and ``dL/dP = S^T dL/d(S P)`` per block. All tensors are in transposed ``(d_in, d_out)`` layout.
    """

    @staticmethod
    def forward(ctx, w_eff_t: Tensor, p: Tensor, weight_t: Tensor, scores_t: Tensor, perm: Tensor, n: int, m: int,
                temperature: float, base: Tensor | None = None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight_t, scores_t, perm, base)
        ctx.n, ctx.m, ctx.t, ctx.p_shape, ctx.p_dtype = n, m, temperature, p.shape, p.dtype
        return w_eff_t.view_as(w_eff_t)

    @staticmethod
    def backward(ctx, grad_t: Tensor):  # type: ignore[override]
        weight_t, scores_t, perm, base = ctx.saved_tensors
        with torch.no_grad():
            g_mask = (grad_t.float() * weight_t.float()).index_select(0, perm)  # dL/dM^T in permuted order
            frame_t = scores_t if base is None else scores_t.index_select(0, base)  # the blocks' channels
            grad_p = soft_top_n_grad_p(frame_t, scores_t.index_select(0, perm), g_mask, ctx.n, ctx.m, ctx.t,
                                       ctx.p_shape[0])
        return grad_t, grad_p.to(ctx.p_dtype), None, None, None, None, None, None, None


@torch.no_grad()
def soft_top_n_grad_p(frame_t: Tensor, permuted_t: Tensor, upstream_t: Tensor, n: int, m: int, temperature: float,
                      blocks: int) -> Tensor:
    """The gradient to the block-diagonal ``P`` (``(blocks, g, g)``, float32) that flows through the soft top-N
    ``M_soft = N * softmax(S P / t)`` over each M-group, given ``upstream_t = dL/dM^T`` in permuted order.

    ``frame_t``: the scores ``S^T`` with rows in the blocks' channel order; ``permuted_t``: ``(S P)^T`` (rows in
    permuted order). The softmax Jacobian gives ``dL/d(S P)``, and ``dL/dP = S^T dL/d(S P)`` per block. All
    ``(d_in, d_out)``. Shared by the mask gradient (:class:`_SoftMaskGradient`, upstream ``G * W``) and the
    kept-score term (``LearnedPermutations._kept``, upstream ``S P``)."""
    d_in, d_out = permuted_t.shape
    s = (permuted_t.float().reshape(d_in // m, m, d_out) / temperature).softmax(dim=1)
    g = upstream_t.float().reshape(d_in // m, m, d_out)
    du = (n / temperature) * s * (g - (g * s).sum(dim=1, keepdim=True))  # dL/d(S P)^T, grouped
    size = d_in // blocks
    return torch.bmm(frame_t.float().reshape(blocks, size, d_out), du.reshape(blocks, size, d_out).transpose(1, 2))


def soft_mask_gradient(w_eff: Tensor, p: Tensor, weight: Tensor, scores: Tensor, perm: Tensor, n: int, m: int,
                       temperature: float, base: Tensor | None = None) -> Tensor:
    """``w_eff`` unchanged, with the straight-through soft-mask gradient to ``p`` added in the backward pass
    (see :class:`_SoftMaskGradient`). ``weight`` and ``scores`` are ``(d_out, d_in)``; ``perm`` the whole hard
    permutation (``base[local]`` under a frame, :func:`hard_permuted_masked_weight`); ``temperature`` the soft
    top-N's, in units of the scores; ``base`` the frame ``p``'s blocks live in."""
    out = _SoftMaskGradient.apply(w_eff.T, p, weight.detach().T, scores.detach().T, perm.to(weight.device), n, m,
                                  temperature, None if base is None else base.to(weight.device))
    return out.T
