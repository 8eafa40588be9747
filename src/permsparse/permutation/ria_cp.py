"""RIA channel permutation (Zhang et al., ICLR 2024, "Plug-and-Play"; docs/method.md §5).

Two steps, as in the RIA reference code (``--reallocation --lsa``):

1. **Heuristic channel reallocation.** Sort the input channels by their summed score (descending) and
   cut the sorted list into M blocks of ``G = d_in / M`` channels. Block ``p`` fills position ``p`` of
   every group, in snake order (forward for even ``p``, reversed for odd ``p``), so every group gets
   one channel from each importance quantile and the strongest channels are spread apart.
2. **Linear sum assignment per position.** For each position ``p`` in turn, with the other positions
   fixed, choose which group receives which of the G channels currently at position ``p``: the
   ``G x G`` score of putting channel ``c`` into group ``k`` is the N:M kept score of group ``k`` with
   ``c`` at position ``p``, and ``scipy.optimize.linear_sum_assignment`` maximises the total.

The assignment scores use the exact identity (N < M): a group with one slot open keeps
``top_{N-1}(rest) + max(x, rest_N)`` per row when ``x`` fills the slot (``rest`` = the other M-1
scores of the row, ``rest_N`` its N-th largest), and ``sum_r max(a_r, b_r) = (sum a + sum b +
||a - b||_1) / 2``, so a whole ``G x G`` score matrix is one ``torch.cdist(p=1)``.

The result is never worse than identity: if the heuristic keeps less than the original order (it
can, e.g. on already well-spread scores), identity is returned and the event is logged and counted
in ``fallbacks``.
"""

from __future__ import annotations

import logging

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from permsparse.permutation.base import PermutationMethod
from permsparse.permutation.channel_swap import torch_threads
from permsparse.sparsity.nm import NMPattern, nm_kept_score

__all__ = ["RIAChannelPermutation", "snake_reallocation"]

log = logging.getLogger(__name__)


def snake_reallocation(scores: Tensor, m: int) -> Tensor:
    """RIA's heuristic reallocation: the permutation dealing channels by summed score in snake order.

    Position ``p`` of group ``g`` receives the sorted channel ``p * G + g`` (even ``p``) or
    ``p * G + G - 1 - g`` (odd ``p``); ties in the summed score keep the lower channel index first.
    """
    d_in = scores.shape[1]
    groups = d_in // m
    order = torch.sort(scores.sum(0), descending=True, stable=True).indices
    perm = torch.empty(d_in, dtype=torch.long, device=scores.device)
    for p in range(m):
        block = order[p * groups : (p + 1) * groups]
        perm[p::m] = block if p % 2 == 0 else block.flip(0)
    return perm


class RIAChannelPermutation(PermutationMethod):
    """RIA CP: snake reallocation by summed score, then one linear assignment per position.

    Args:
        lsa: run the linear-assignment refinement (step 2); ``False`` gives the reallocation alone.
        rounds: sweeps over the M positions (the reference code does one).
        blocks: solve each assignment inside ``blocks`` contiguous blocks of groups instead of over all
            groups at once (the reference code's ``--fast`` option for wide layers); 1 = global.
        num_threads: torch intra-op threads during the search, restored afterwards (``None``: leave
            torch's setting); 1 is faster for these mid-sized ops, especially on a shared machine.

    ``fallbacks`` counts the calls that returned identity because the heuristic kept less.
    """

    def __init__(
        self, lsa: bool = True, rounds: int = 1, blocks: int = 1, num_threads: int | None = 1
    ) -> None:
        if rounds < 0 or blocks < 1:
            raise ValueError(
                f"RIA CP needs rounds >= 0 and blocks >= 1, got rounds={rounds}, blocks={blocks}"
            )
        self.lsa = lsa
        self.rounds = rounds
        self.blocks = blocks
        self.num_threads = num_threads
        self.fallbacks = 0

    def find(self, scores: Tensor, pattern: NMPattern, name: str = "group") -> Tensor:
        """Return ``perm`` (long, ``(d_in,)``); never keeps less than identity."""
        pattern = self.check_scores(scores, pattern, name)
        device = scores.device
        d_in = scores.shape[1]
        n, m = pattern.n, pattern.m
        groups = d_in // m
        identity = torch.arange(d_in, device=device)
        if n == m or groups == 1 or scores.shape[0] == 0:
            return identity  # nothing pruned, a single group or no rows: every order is equivalent
        if self.blocks > groups:
            raise ValueError(
                f"{name}: blocks={self.blocks} exceeds the {groups} groups of d_in={d_in} at M={m}"
            )
        with torch_threads(self.num_threads):
            s = scores.detach().to("cpu", torch.float64)
            perm = snake_reallocation(s, m)
            if self.lsa:
                for _ in range(self.rounds):
                    for p in range(m):
                        for block in torch.arange(groups).tensor_split(self.blocks):
                            self._assign_position(s, perm, n, m, p, block)
            kept = float(nm_kept_score(s[:, perm], pattern))
            kept_id = float(nm_kept_score(s, pattern))
        if kept < kept_id:
            self.fallbacks += 1
            log.info(
                "%s: RIA CP kept %.6g < identity %.6g; returning identity (fallback #%d)",
                name,
                kept,
                kept_id,
                self.fallbacks,
            )
            return identity
        return perm.to(device)

    @staticmethod
    def _assign_position(s: Tensor, perm: Tensor, n: int, m: int, p: int, block: Tensor) -> None:
        """Reassign, in place, the channels at position ``p`` among the groups in ``block``."""
        view = perm.view(-1, m)
        chans = view[block]  # (k, M) channel ids of the groups of this block
        x = s[:, chans]  # (R, k, M)
        rest = torch.cat([x[..., :p], x[..., p + 1 :]], dim=-1).sort(dim=-1, descending=True).values
        base = rest[..., : n - 1].sum(dim=(0, 2))  # (k,): the N-1 best of the rest, kept whatever comes in
        thresh = rest[..., n - 1]  # (R, k): the N-th best of the rest, the bar a newcomer must beat
        cand = x[..., p]  # (R, k): the channel now at position p of each group
        l1 = torch.cdist(thresh.T.contiguous(), cand.T.contiguous(), p=1)  # (k groups, k channels)
        kept_if = base[:, None] + (thresh.sum(0)[:, None] + cand.sum(0)[None, :] + l1) / 2  # [group, channel]
        rows, cols = linear_sum_assignment(kept_if.numpy(), maximize=True)
        new = chans[torch.as_tensor(cols), p]
        view[block[torch.as_tensor(rows)], p] = new

