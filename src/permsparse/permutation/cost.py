"""The learnable cost of the paper's method (METHOD.md section 4): one ``g x g`` cost per channel group.

``C[k, i, j]`` is the cost of putting original channel ``i`` of group ``k`` at position ``j``. The
module normalises the free parameter, runs log-domain Sinkhorn, hardens with Hungarian and hands back
a straight-through permutation matrix. Only these parameters train; the model stays frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from permsparse.permutation.base import block_to_global, global_to_block
from permsparse.permutation.hungarian import hungarian, perm_to_matrix, straight_through
from permsparse.permutation.sinkhorn import doubly_stochastic_residual, log_sinkhorn, log_sinkhorn_warm

__all__ = ["LearnableCost"]


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
        if not self.normalize:
            return self.raw
        std, mean = torch.std_mean(self.raw, dim=(-2, -1), keepdim=True)  # one pass for both
        return (self.raw - mean) / (std + self.eps)

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
        cost = self.cost()
        if warm_iters is None:
            log_p = log_sinkhorn(cost, tau, n_iters, gumbel_scale, generator)
        else:
            start = (self.row_potential, self.col_potential) if bool(self.warm) else None
            log_p, (f, g) = log_sinkhorn_warm(cost, tau, warm_iters if start is not None else n_iters, start,
                                              gumbel_scale, generator)
            self.row_potential.copy_(f)
            self.col_potential.copy_(g)
            self.warm.fill_(True)
        soft = log_p.exp()
        self.last_residual = float(doubly_stochastic_residual(soft.detach()))
        perm = hungarian(soft.detach(), maximize=True)
        if self.tie > 1:  # after Sinkhorn, so tied groups share the (Gumbel-noised) matrix and its gradient
            soft, perm = soft.repeat_interleave(self.tie, dim=0), perm.repeat_interleave(self.tie, dim=0)
        if not hard:
            return soft, perm
        return straight_through(perm_to_matrix(perm, soft.dtype), soft), perm

    @torch.no_grad()
    def harden(self) -> Tensor:
        """The zero-temperature limit: the assignment of least total cost, as one ``(d_in,)`` permutation."""
        return block_to_global(hungarian(self.cost(), maximize=False).repeat_interleave(self.tie, dim=0))
