"""The learnable cost of the paper's method (docs/method.md §4): one ``g x g`` cost per channel group.

``C[k, i, j]`` is the cost of putting original channel ``i`` of group ``k`` at position ``j``. The
module normalises the free parameter, runs log-domain Sinkhorn, hardens with Hungarian and hands back
a straight-through permutation matrix. Only these parameters train; the model stays frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from permsparse.permutation.base import block_to_global, global_to_block
from permsparse.permutation.hungarian import hungarian, hungarian_many, perm_to_matrix, straight_through
from permsparse.permutation.sinkhorn import doubly_stochastic_residual, log_sinkhorn, sinkhorn_warm

__all__ = ["LearnableCost", "solve_costs", "standardize_blocks"]


class _StandardizeBlocks(torch.autograd.Function):
    """``(x - mean) / (std + eps)`` per ``g x g`` block (unbiased std, as ``torch.std``), with a hand-written
    backward: three fused passes instead of the dozen elementwise kernels autograd records for
    ``std_mean``, subtraction and division (the composite is about 5x slower on CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        n = x.shape[-1] * x.shape[-2]
        centered = x - x.mean((-2, -1), keepdim=True)
        std = torch.linalg.vector_norm(centered, dim=(-2, -1), keepdim=True) / max(n - 1, 1) ** 0.5
        out = centered.div_(std + eps)
        ctx.save_for_backward(out, std)
        ctx.eps, ctx.n = eps, n
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        out, std = ctx.saved_tensors
        n = ctx.n
        # d/dx of (x - mu) / (s + eps): (g - mean(g)) / (s + eps) - y * sum(g * y) / ((n - 1) s)
        along_out = (grad * out).sum((-2, -1), keepdim=True)
        scale = torch.where(std > 0, 1 / (max(n - 1, 1) * std), torch.zeros_like(std))
        result = (grad - grad.mean((-2, -1), keepdim=True)).div_(std + ctx.eps)
        return result.addcmul_(out, along_out * scale, value=-1), None


def standardize_blocks(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Each ``g x g`` block of ``x`` (``(..., g, g)``) standardised to mean 0 and (unbiased) std 1."""
    return _StandardizeBlocks.apply(x, eps)


class LearnableCost(nn.Module):
    """Block-diagonal learnable permutation of ``d_in`` channels split into ``groups`` contiguous groups.

    Args:
        d_in: channels to permute.
        groups: number G of contiguous channel groups (the paper's default is 4); ``g = d_in / G``.
        init: ``"identity"`` (cost ``-I`` + noise, so the first hard permutation is the identity) or
            a permutation tensor ``(d_in,)`` to start from (e.g. the RIA heuristic's).
        init_scale: magnitude of the ``-I`` (or ``-P_init``) term before normalisation.
        noise: std of the Gaussian noise added at initialisation, relative to ``init_scale`` (breaks symmetry).
        normalize: standardise each ``g x g`` block (mean 0, std 1) before Sinkhorn.
        seed: seed of the initial noise.
        tie: consecutive groups sharing one cost (default 1: none). With ``tie > 1`` the free parameter is
            ``(G / tie, g, g)``; Sinkhorn and Hungarian run once per shared cost and the result is repeated
            (``repeat_interleave``) for the ``tie`` groups, so they always get the same permutation and the
            gradients of all of them flow into the shared cost. ``perm.foldable`` ties the heads of an
            attention output projection per kv head (grouped-query attention): ``G = num_heads``,
            ``g = head_dim``, ``tie = num_heads / num_kv_heads``.
    """

    def __init__(
        self,
        d_in: int,
        groups: int = 4,
        init: str | Tensor = "identity",
        init_scale: float = 1.0,
        noise: float = 0.01,
        normalize: bool = True,
        eps: float = 1e-6,
        seed: int = 0,
        tie: int = 1,
    ) -> None:
        super().__init__()
        if groups < 1 or d_in % groups:
            raise ValueError(f"d_in={d_in} is not divisible by groups={groups}")
        if tie < 1 or groups % tie:
            raise ValueError(f"groups={groups} is not a multiple of tie={tie}")
        self.d_in, self.groups, self.group_size, self.tie = d_in, groups, d_in // groups, tie
        self.normalize, self.eps = normalize, eps
        gen = torch.Generator().manual_seed(seed)
        g, free = self.group_size, groups // tie
        if isinstance(init, str):
            if init != "identity":
                raise ValueError(f"unknown cost init {init!r}; use 'identity' or pass a permutation tensor")
            target = torch.eye(g).expand(free, g, g)
        else:
            local = global_to_block(init.long().cpu(), groups)
            shared = local[::tie]
            if not torch.equal(shared.repeat_interleave(tie, dim=0), local):
                raise ValueError(f"init permutation differs across the {tie} groups that share one cost (tie={tie})")
            target = perm_to_matrix(shared)
        # Noise relative to the scale, so the first hard permutation is ``target`` whatever init_scale is.
        raw = init_scale * (-target + noise * torch.randn(free, g, g, generator=gen))
        self.raw = nn.Parameter(raw.contiguous())
        # Sinkhorn dual potentials of the last call (cost units), for warm starts; checkpointed with the costs.
        self.register_buffer("row_potential", torch.zeros(free, g))
        self.register_buffer("col_potential", torch.zeros(free, g))
        self.register_buffer("warm", torch.zeros((), dtype=torch.bool))
        self.last_residual = float("nan")

    def cost(self) -> Tensor:
        """The (normalised) free cost tensor ``(G / tie, g, g)`` (``(G, g, g)`` without ties)."""
        return standardize_blocks(self.raw, self.eps) if self.normalize else self.raw

    def forward(
        self,
        tau: float,
        n_iters: int = 20,
        hard: bool = True,
        gumbel_scale: float = 0.0,
        generator: torch.Generator | None = None,
        warm_iters: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(P, perm)``: the ``(G, g, g)`` matrix used in the forward pass and the hard ``(G, g)``.

        ``hard=True``: ``P`` equals the Hungarian hardening of the Sinkhorn matrix in value and carries
        the Sinkhorn gradient (straight-through). ``hard=False``: ``P`` is the Sinkhorn matrix itself.
        ``warm_iters``: if set, start Sinkhorn from the previous call's potentials and run that many
        iterations (the first call still runs ``n_iters`` from scratch). The doubly-stochastic residual
        of the result is kept in ``last_residual``.
        """
        return solve_costs([self], tau, n_iters, hard, gumbel_scale, generator, warm_iters)[0]

    @torch.no_grad()
    def harden(self) -> Tensor:
        """The zero-temperature limit: the assignment of least total cost, as one ``(d_in,)`` permutation."""
        return block_to_global(hungarian(self.cost(), maximize=False).repeat_interleave(self.tie, dim=0))


def solve_costs(
    costs: Sequence[LearnableCost],
    tau: float,
    n_iters: int = 20,
    hard: bool = True,
    gumbel_scale: float = 0.0,
    generator: torch.Generator | None = None,
    warm_iters: int | None = None,
    hard_value: bool = True,
) -> list[tuple[Tensor, Tensor]]:
    """:meth:`LearnableCost.forward` of many costs at once: ``[(P, perm), ...]`` in the order of ``costs``.

    ``hard_value=False`` (with ``hard=True``) returns the Sinkhorn matrix itself as ``P``: its gradient is
    exactly the straight-through one (``P_hard + P_soft - P_soft.detach()`` has the gradient of ``P_soft``),
    but its value is not the permutation. A consumer that reads the permutation from ``perm`` and uses ``P``
    only to carry the gradient (as :class:`~permsparse.permutation.learned.LearnedPermutations` does) saves
    building the ``(blocks, g, g)`` hard matrices and the estimator.

    Costs with the same block size are stacked into ``(blocks, g, g)`` tensors, so standardisation,
    Sinkhorn, Hungarian and the straight-through estimate run once per stack instead of once per layer
    (docs/method.md §4.2: batched over all groups in one tensor op). On CPU a stack holds at most
    ``_CPU_STACK_ELEMENTS`` entries: Sinkhorn streams its matrix about 30 times a step, and a stack that
    stays in cache is faster than one that does not (SmolLM2: one stack per 384-block layer 3.5x faster
    than all of them at once; 18 layers of 144-blocks per stack 1.5x faster than one each). On GPU a stack
    holds every cost of its block size. The values are those of one call per cost; only the Gumbel noise,
    drawn once per stack, comes from the generator in another order.
    """
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(costs)
    stacks: dict[tuple, list[int]] = {}
    for index, cost in enumerate(costs):
        key = (cost.group_size, cost.normalize, cost.eps, bool(cost.warm), cost.raw.device, cost.raw.dtype)
        stacks.setdefault(key, []).append(index)
    solved = [(indices, _sinkhorn_stack([costs[i] for i in indices], tau, n_iters, gumbel_scale, generator, warm_iters))
              for same_size in stacks.values() for indices in _chunks(costs, same_size)]
    # every stack's assignments in one pass of the solver threads
    perms = hungarian_many([soft.detach() for _, soft in solved], maximize=True)
    for (indices, soft), perm in zip(solved, perms, strict=True):
        p = straight_through(perm_to_matrix(perm, soft.dtype), soft) if hard and hard_value else soft
        sizes = [costs[i].raw.shape[0] for i in indices]
        for index, p_part, perm_part in zip(indices, p.split(sizes), perm.split(sizes), strict=True):
            tie = costs[index].tie
            if tie > 1:  # after Sinkhorn, so tied groups share the (Gumbel-noised) matrix and its gradient
                p_part, perm_part = p_part.repeat_interleave(tie, dim=0), perm_part.repeat_interleave(tie, dim=0)
            results[index] = (p_part, perm_part)
    return results  # type: ignore[return-value]


_CPU_STACK_ELEMENTS = 1_500_000


def _chunks(costs: Sequence[LearnableCost], indices: list[int]) -> list[list[int]]:
    """``indices`` (costs of one block size) cut into stacks of at most ``_CPU_STACK_ELEMENTS`` on CPU."""
    if costs[indices[0]].raw.device.type != "cpu":
        return [indices]
    chunks: list[list[int]] = [[]]
    size = 0
    for index in indices:
        elements = costs[index].raw.numel()
        if chunks[-1] and size + elements > _CPU_STACK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(index)
        size += elements
    return chunks


def _sinkhorn_stack(costs: list[LearnableCost], tau: float, n_iters: int, gumbel_scale: float,
                    generator: torch.Generator | None, warm_iters: int | None) -> Tensor:
    """The Sinkhorn matrices of ``costs`` stacked; updates their potentials and ``last_residual``."""
    first = costs[0]
    raw = torch.cat([c.raw for c in costs]) if len(costs) > 1 else first.raw
    cost = standardize_blocks(raw, first.eps) if first.normalize else raw
    sizes = [c.raw.shape[0] for c in costs]
    if warm_iters is None:
        soft = log_sinkhorn(cost, tau, n_iters, gumbel_scale, generator).exp()
    else:
        start = None
        if bool(first.warm):
            start = (torch.cat([c.row_potential for c in costs]), torch.cat([c.col_potential for c in costs]))
        soft, (f, g) = sinkhorn_warm(cost, tau, warm_iters if start is not None else n_iters, start,
                                     gumbel_scale, generator)
        for c, f_part, g_part in zip(costs, f.split(sizes), g.split(sizes), strict=True):
            c.row_potential.copy_(f_part)
            c.col_potential.copy_(g_part)
            c.warm.fill_(True)
    with torch.no_grad():
        residuals = doubly_stochastic_residual(soft, per_matrix=True).tolist()
    offset = 0
    for c, size in zip(costs, sizes, strict=True):
        c.last_residual = max(residuals[offset:offset + size])
        offset += size
    return soft
