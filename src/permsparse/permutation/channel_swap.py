"""CP: greedy channel swap with escapes, stripe-group search and perturbations (Pool & Yu, NeurIPS 2021;
NVIDIA Apex ASP).

Objective: the total score kept by the N:M mask of the permuted scores ``S[:, perm]`` (docs/method.md §5).
The search starts from identity, its greedy phases only ever apply improvements, and the escapes and
perturbations end on the best permutation they have seen, so the result never keeps less than
identity; ``find`` checks this again in float64 before returning.

Order of the phases: swap convergence; stripe/swap alternation; escapes; stripe/swap alternation
again if the escapes helped; perturbations (iterated local search), on small layers.

**Channel swap.** Swapping column ``a`` of group ``A`` with column ``b`` of group ``B`` changes only
those two groups. For one row of ``A`` let ``v_1 >= ... >= v_M`` be its scores. Removing ``a`` and
inserting a value ``x`` keeps ``kept - s_a + max(x, v_{N+1})`` if ``a`` was kept in that row, and
``kept - v_N + max(x, v_N)`` if it was pruned. Summed over rows, the change of group ``A`` when
``a`` is replaced by column ``b`` is exactly::

    P[a, b] = sum_r (S[r, b] - min(S[r, b], v_N[r])) + sum_r k_a[r] * (clamp(S[r, b], v_{N+1}[r], v_N[r]) - S[r, a])

(``k_a[r]`` = 1 where ``a`` is kept), and the swap gain is ``P[a, b] + P[b, a]``. All rows of ``P``
belonging to one group cost one elementwise ``min`` and ``clamp`` over the ``(rows, d_in)`` scores
plus an ``(M, rows) @ (rows, d_in)`` matmul, so the full ``d_in x d_in`` gain matrix costs ``G =
d_in / M`` such passes (a quarter of the ``d_in`` L1-distance rows of the ``cdist`` formulation at
M = 4). Between passes only the rows of the groups changed by the applied swaps are recomputed.
Each pass applies the best swap of a set of disjoint group pairs (each group at most once, found by
repeated mutual-best matching), so every applied gain is exact; each is also re-checked in float64
and float32 rounding noise is never applied (the objective strictly increases, so the search ends).

**Escapes.** After convergence, ``escape_attempts`` times: force the best swap of a random group pair
among the ``escape_pool`` least-loss pairs, converge greedily again, and keep the result only if it
beats the best permutation seen (otherwise return to it).

**Stripe-group search.** For a pair of groups, every distinct split of their ``2M`` columns into two
groups (``C(2M-1, M-1)``: 35 for M = 4) is a candidate; the splits that move at most one column each
way are single swaps already exhausted by the swap phase, so only the others (18 for M = 4) are
evaluated, with a sorting network instead of ``topk``; ``stripe_max_moved`` (default 2: all splits up
to M = 5, the 784 double swaps at M = 8) bounds how many columns a split may move. Evaluating all
``G^2/2`` pairs is affordable on small layers but not on wide ones, so each round evaluates at most
``stripe_pairs`` not-yet-checked pairs (and at most ``stripe_budget`` pair-split evaluations), ranked
by their best single-swap gain: documented bounds, not a fallback (``None`` lifts them). The best
disjoint improvements are applied and the swap phase resumes. Rounds stop when one finds nothing or
after ``max_rounds``. Unlike Apex there is no fallback to random search on wide
layers and any N:M with N < M works (N == M prunes nothing: identity is returned).

**Perturbations.** Iterated local search, from the best permutation the escapes left: each round
swaps ``perturb_swaps`` random channel pairs (each between two different groups), converges greedily
again, and runs the stripe/swap alternation on a new best. The escapes stop finding anything once
they have tried the few pairs of a small layer (120 at 64 channels, M = 4); these random kicks
still do. A result that loses less than a threshold (``perturb_slack`` times the mean kept score per
channel, decaying linearly to 0 over the rounds) becomes the point the next kick starts from
(threshold accepting); anything else is undone, and the phase ends on the best permutation seen.
There are ``min(perturb_rounds_per_group * G, perturb_work // (rows * d_in))`` rounds. Few groups
need few rounds (on random scores 4 groups stop improving after about 50, 8 after about 200, while
16 still gain at 400). The work budget bounds wide layers, since a round recomputes a few groups'
gain rows of ``rows * d_in`` work each, and there the escapes, which pick their swaps among the
least-losing ones, gain far more per second than random kicks. By default Apex's 128 x 64 test
matrices get 400 rounds (about 1 s on one core), a 576 x 576 layer 12 and a 3072 x 576 one 2.

Cost: memory ``d_in^2`` float32 for the gain matrix (9.4 MB at d_in = 1536); time is dominated by
the per-group gain rows, about ``rows * d_in`` elementwise work per changed group (on small layers,
by the per-op overhead: there several groups share each op).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from permsparse.permutation.base import PermutationMethod
from permsparse.sparsity.nm import NMPattern, nm_kept_score

__all__ = ["GreedyChannelSwap", "torch_threads"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch intra-op threads (``None``: unchanged), then restore.

    The CPU searches here issue thousands of small ops; a thread pool's synchronisation costs more
    than it gives on them, and far more when other processes share the cores (a parallel op waits
    for its slowest, possibly descheduled, thread).
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class GreedyChannelSwap(PermutationMethod):
    """Greedy channel swap + escapes + stripe-group search + perturbations on the N:M kept score (the "CP"
    baseline).

    Args:
        max_passes: cap on the number of swap passes of each greedy convergence (``None``: until no
            swap gains). A pass applies many disjoint swaps at once.
        escape_attempts: forced small-loss swaps after convergence (Apex's default 100); 0 disables.
        escape_pool: an escape picks a random group pair among the ``escape_pool`` least-loss ones
            (each pair tried at most once until an escape succeeds).
        stripe_group: run the stripe-group (pairs of groups, all splits) search.
        stripe_pairs: group pairs evaluated per stripe round, most promising first (``None``: all).
        stripe_budget: cap on (pair, split) evaluations per stripe round, so that patterns with many
            splits per pair stay affordable: a round evaluates ``min(stripe_pairs, stripe_budget //
            splits)`` pairs (at least 1). The default equals 128 pairs at M = 4 (18 splits each);
            ``None``: no cap.
        stripe_max_moved: largest number of columns a split moves each way (``None``: every distinct
            split). Splits moving one column are single swaps (left to the swap phase). The default 2
            is every split for M <= 5; at M = 8 it gives the 784 double swaps of the 6435 splits.
        max_rounds: cap on stripe/swap alternations.
        perturb_rounds_per_group: rounds of the perturbation phase (iterated local search after the
            escapes) per group of M channels, so ``perturb_rounds_per_group * d_in / M`` at most; 0
            disables the phase.
        perturb_swaps: random cross-group channel swaps per perturbation (the kick's strength).
        perturb_work: work budget of the perturbation phase: at most ``perturb_work // (rows *
            d_in)`` rounds, so that small layers get many and wide ones (where the escapes gain more
            per second) a few or none. The defaults give a 128 x 64 layer 400 rounds (2:4), 576 x
            576 12 and 3072 x 576 2; ``None``: no work bound.
        perturb_slack: threshold accepting: a perturbed optimum losing less than ``perturb_slack``
            times the mean kept score per channel (decaying linearly to 0 over the rounds) becomes the
            start of the next kick; 0: kicks always start from the best permutation. The phase returns
            the best permutation seen either way.
        seed: seed of the escape and perturbation choices (the result is deterministic given the seed).
        progress: log progress at INFO level.
        rel_tol: a gain counts only above ``rel_tol`` times the mean column sum of the scores
            (float32 gains must not chase rounding noise).
        row_block: rows per block of the gain computation (cache blocking; tuning only).
        num_threads: torch intra-op threads during the search (restored afterwards; see
            :func:`torch_threads`); ``None`` leaves torch's setting alone.

    After ``find``, ``last_stats`` holds counters (passes, swaps, escapes won, stripe pairs evaluated
    and moves applied, perturbation rounds and new bests), the kept-score gain after each phase, and
    the identity / final kept scores.
    """

    def __init__(
        self,
        max_passes: int | None = None,
        escape_attempts: int = 100,
        escape_pool: int = 256,
        stripe_group: bool = True,
        stripe_pairs: int | None = 128,
        stripe_budget: int | None = 2304,
        stripe_max_moved: int | None = 2,
        max_rounds: int = 20,
        perturb_rounds_per_group: int = 25,
        perturb_swaps: int = 6,
        perturb_work: int | None = 2**22,
        perturb_slack: float = 0.03,
        seed: int = 0,
        progress: bool = False,
        rel_tol: float = 1e-6,
        row_block: int = 1024,
        num_threads: int | None = 1,
    ) -> None:
        if max_passes is not None and max_passes < 0:
            raise ValueError(f"max_passes must be >= 0 or None, got {max_passes}")
        if escape_attempts < 0 or escape_pool < 1 or max_rounds < 0 or row_block < 1:
            raise ValueError(
                f"need escape_attempts >= 0, escape_pool >= 1, max_rounds >= 0, row_block >= 1; got "
                f"{escape_attempts}, {escape_pool}, {max_rounds}, {row_block}"
            )
        if perturb_rounds_per_group < 0 or perturb_swaps < 1 or not 0 <= perturb_slack < math.inf:
            raise ValueError(
                f"need perturb_rounds_per_group >= 0, perturb_swaps >= 1, finite perturb_slack >= 0; got "
                f"{perturb_rounds_per_group}, {perturb_swaps}, {perturb_slack}"
            )
        for key, value in (
            ("stripe_pairs", stripe_pairs),
            ("stripe_budget", stripe_budget),
            ("perturb_work", perturb_work),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or None, got {value}")
        if stripe_max_moved is not None and stripe_max_moved < 2:
            raise ValueError(
                f"stripe_max_moved must be >= 2 or None (1 is a plain swap), got {stripe_max_moved}"
            )
        self.max_passes = max_passes
        self.escape_attempts = escape_attempts
        self.escape_pool = escape_pool
        self.stripe_group = stripe_group
        self.stripe_pairs = stripe_pairs
        self.stripe_budget = stripe_budget
        self.stripe_max_moved = stripe_max_moved
        self.max_rounds = max_rounds
        self.perturb_rounds_per_group = perturb_rounds_per_group
        self.perturb_swaps = perturb_swaps
        self.perturb_work = perturb_work
        self.perturb_slack = perturb_slack
        self.seed = seed
        self.progress = progress
        self.rel_tol = rel_tol
        self.row_block = row_block
        self.num_threads = num_threads
        self.last_stats: dict[str, float] = {}

    def find(self, scores: Tensor, pattern: NMPattern, name: str = "group") -> Tensor:
        """Return ``perm`` (long, ``(d_in,)``) maximising the N:M kept score of ``scores[:, perm]``."""
        pattern = self.check_scores(scores, pattern, name)
        device = scores.device
        d_in = scores.shape[1]
        identity = torch.arange(d_in, device=device)
        if pattern.n == pattern.m or d_in == pattern.m or scores.shape[0] == 0:
            return identity  # nothing is pruned, a single group or no rows: every permutation is equivalent
        start = time.perf_counter()
        with torch_threads(self.num_threads):
            search = _Search(scores.detach().float().cpu(), pattern, self, name)
            perm = search.run()
        s64 = scores.detach().double()
        kept_id = float(nm_kept_score(s64, pattern))
        kept = float(nm_kept_score(s64[:, perm.to(device)], pattern))
        if kept < kept_id:  # cannot happen by construction (only improvements are accepted); guard anyway
            log.warning(
                "%s: channel swap ended below identity (%.6g < %.6g); returning identity", name, kept, kept_id
            )
            perm, kept = identity.cpu(), kept_id
        search.stats.update(kept_identity=kept_id, kept=kept, seconds=time.perf_counter() - start)
        self.last_stats = search.stats
        if self.progress:
            log.info(
                "%s: channel swap done in %.2f s: kept %.6g vs identity %.6g",
                name,
                search.stats["seconds"],
                kept,
                kept_id,
            )
        return perm.to(device)


class _Search:
    """Mutable search state; every tensor is indexed by *position* in the current permutation."""

    def __init__(self, scores: Tensor, pattern: NMPattern, cfg: GreedyChannelSwap, name: str) -> None:
        self.cfg, self.name = cfg, name
        self.t0 = time.perf_counter()
        self.S = scores.contiguous()
        self.R, self.D = self.S.shape
        self.n, self.m = pattern.n, pattern.m
        self.G = self.D // self.m
        self.tol = cfg.rel_tol * max(float(self.S.sum()) / self.D, 1e-30)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm = torch.arange(self.D)
        self.ST = self.S.T.contiguous()  # (D, R): a channel's scores are one contiguous row
        self.colsum = self.S.sum(0)  # by channel
        # P[i, j]: change of the kept score of group(i) if the channel at position i is replaced by the
        # channel at position j. pair_best[g, h]: best swap gain between groups g and h.
        self.P = torch.zeros(self.D, self.D)
        self.kept_g = torch.zeros(self.G, dtype=torch.float64)
        self.pair_best = torch.full((self.G, self.G), -math.inf)
        self.checked = torch.zeros(self.G, self.G, dtype=torch.bool)  # stripe-searched, nothing found
        # during escapes: group -> (its P rows indexed by channel, its kept score) at the last best state
        self._undo: dict[int, tuple[Tensor, float]] | None = None
        self.stats: dict[str, float] = {
            "passes": 0,
            "swaps": 0,
            "escapes_won": 0,
            "stripe_pairs": 0,
            "stripe_moves": 0,
            "perturb_rounds": 0,
            "perturb_won": 0,
        }
        all_groups = torch.arange(self.G)
        self._recompute(all_groups)

    # ----------------------------------------------------------------- gain bookkeeping
    def total(self) -> float:
        return float(self.kept_g.sum())

    def _recompute(self, groups: Tensor) -> None:
        """Recompute ``P`` rows, kept scores, pair gains and stripe flags of ``groups`` (current positions)."""
        chunk = max(1, (1 << 23) // (self.m * self.D))  # bounds the (c, M, D) temporaries to ~32 MB
        for c0 in range(0, groups.numel(), chunk):
            self._recompute_chunk(groups[c0 : c0 + chunk])

    def _recompute_chunk(self, groups: Tensor) -> None:
        m, n, D = self.m, self.n, self.D
        pos = (groups[:, None] * m + torch.arange(m)).reshape(-1)
        xs = self.ST[self.perm[pos]].view(-1, m, self.R)  # (c, M, R): each group's own scores
        lanes = _sort_desc(list(xs.unbind(1)))  # M x (c, R), descending
        self.kept_g[groups] = sum(lane.sum(-1, dtype=torch.float64) for lane in lanes[:n])
        v_n, v_n1 = lanes[n - 1], lanes[n]  # (c, R): the N-th and (N+1)-th largest of every row
        # kept where the score beats the (N+1)-th; on a tie v_N == v_N+1 both formulas of P agree
        kept = (xs > v_n1[:, None, :]).float()  # (c, M, R)
        self_term = (kept * xs).sum(-1)  # (c, M)
        # P row = sum_r S - sum_r min(S, v_N) + kept @ clamp(S, v_N+1, v_N) - self term, computed
        # against the channel-ordered scores in blocks of rows (a small scratch buffer), then put in
        # position order. Small layers take several groups per op (a scratch of at most 2**18 scores):
        # their cost is the per-op overhead, not the arithmetic.
        c = groups.numel()
        out = self.colsum.expand(c, m, D).clone()
        rows = min(self.cfg.row_block, self.R)
        batch = min(c, max(1, (1 << 18) // (rows * D)))
        buf = torch.empty(batch, rows, D)
        for r0 in range(0, self.R, rows):
            block = self.S[r0 : r0 + rows]
            for j0 in range(0, c, batch):
                js = slice(j0, j0 + batch)
                scratch = buf[: min(batch, c - j0), : block.shape[0]]
                torch.minimum(block, v_n[js, r0 : r0 + rows, None], out=scratch)
                out[js].sub_(scratch.sum(1, keepdim=True))
                scratch.clamp_(min=v_n1[js, r0 : r0 + rows, None])
                out[js].baddbmm_(kept[js, :, r0 : r0 + rows], scratch)
        out -= self_term[..., None]
        self.P[pos] = out.reshape(-1, D)[:, self.perm]
        self._update_pairs(groups)
        self.checked[groups, :] = False
        self.checked[:, groups] = False

    def _update_pairs(self, groups: Tensor) -> None:
        G, m = self.G, self.m
        p4 = self.P.view(G, m, G, m)
        gain = p4[groups] + p4[:, :, groups, :].permute(2, 3, 0, 1)  # (c, M, G, M): [x, a, h, b]
        best = gain.amax(dim=(1, 3))  # (c, G)
        self.pair_best[groups, :] = best
        self.pair_best[:, groups] = best.T
        self.pair_best[groups, groups] = -math.inf

    def _best_swaps(self, g: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Positions ``(i, j)`` of the best swap between groups ``g[k]`` and ``h[k]``."""
        m = self.m
        p4 = self.P.view(self.G, m, self.G, m)
        block = p4[g, :, h, :] + p4[h, :, g, :].transpose(1, 2)  # (k, M_a, M_b)
        flat = block.reshape(len(g), -1).argmax(dim=1)
        return g * m + flat // m, h * m + flat % m

    def _kept_of(self, cols: Tensor) -> Tensor:
        """Exact (float64) N:M kept score of groups made of the channels at positions ``cols`` (k, M)."""
        lanes = _sort_desc(list(self.ST[self.perm[cols]].unbind(1)))  # M x (k, R)
        return sum(lane.sum(-1, dtype=torch.float64) for lane in lanes[: self.n])

    def _exact_swap_gain(self, i: Tensor, j: Tensor) -> Tensor:
        """Exact (float64) gain of swapping positions ``i[k]`` and ``j[k]`` (different groups)."""
        m = self.m
        ga, gb = i // m, j // m
        cols_a = ga[:, None] * m + torch.arange(m)
        cols_b = gb[:, None] * m + torch.arange(m)
        cols_a = torch.where(cols_a == i[:, None], j[:, None], cols_a)
        cols_b = torch.where(cols_b == j[:, None], i[:, None], cols_b)
        return self._kept_of(cols_a) + self._kept_of(cols_b) - self.kept_g[ga] - self.kept_g[gb]

    def _abs_tol(self, g: Tensor, h: Tensor) -> Tensor:
        """Smallest exact gain worth taking: float64 rounding of the two groups' kept scores."""
        return 1e-12 * (self.kept_g[g].abs() + self.kept_g[h].abs() + 1e-300)

    def _move_columns(self, new_perm: Tensor) -> Tensor:
        """Reorder the position-indexed columns for ``new_perm``; returns the positions that changed."""
        diff = (new_perm != self.perm).nonzero().squeeze(1)
        if diff.numel():
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(self.D)
            src = inv[new_perm[diff]]  # old positions of the channels that land on diff
            self.P[:, diff] = self.P[:, src]
            self.perm = new_perm.clone()
        return diff

    def move_to(self, new_perm: Tensor) -> None:
        """Switch to ``new_perm``, recomputing only the groups that change."""
        diff = (new_perm != self.perm).nonzero().squeeze(1)
        if diff.numel() == 0:
            return
        groups = torch.unique(diff // self.m)
        if self._undo is not None:  # remember each group's rows as they were when the log started
            m = self.m
            for g in groups.tolist():
                if g not in self._undo:
                    by_channel = torch.empty(m, self.D)
                    by_channel[:, self.perm] = self.P[g * m : (g + 1) * m]
                    self._undo[g] = (by_channel, float(self.kept_g[g]))
        self._move_columns(new_perm)
        self._recompute(groups)

    def _restore(self, perm: Tensor) -> None:
        """Return to ``perm``, the state when the undo log started, from the log instead of recomputing.

        A row of ``P`` depends only on its group's channels and on which channel sits in each column,
        so the logged rows (indexed by channel) are exact again once the columns are back in place.
        """
        assert self._undo is not None
        self._move_columns(perm)
        if self._undo:
            m = self.m
            groups = torch.tensor(sorted(self._undo))
            for g, (by_channel, kept) in self._undo.items():
                self.P[g * m : (g + 1) * m] = by_channel[:, self.perm]
                self.kept_g[g] = kept
            self._update_pairs(groups)
        self._undo = {}

    def apply_swaps(self, i: Tensor, j: Tensor) -> None:
        new_perm = self.perm.clone()
        new_perm[i], new_perm[j] = self.perm[j], self.perm[i]
        self.move_to(new_perm)

    # ----------------------------------------------------------------- phases
    def _select_pairs(self) -> tuple[Tensor, Tensor]:
        """Disjoint group pairs with positive best gain: repeated mutual-best matching (greedy-like)."""
        G = self.G
        pb = self.pair_best.clone()
        free = torch.ones(G, dtype=torch.bool)
        arange = torch.arange(G)
        gs, hs = [], []
        while True:
            pb[~free, :] = -math.inf
            pb[:, ~free] = -math.inf
            best, partner = pb.max(dim=1)
            good = best > self.tol
            if not good.any():
                break
            mutual = good & (partner[partner] == arange) & (arange < partner)
            if not mutual.any():  # exact ties can hide every mutual pair: take the global best alone
                flat = int(pb.argmax())
                mutual = torch.zeros(G, dtype=torch.bool)
                g, h = divmod(flat, G)
                mutual[min(g, h)] = True
                partner = partner.clone()
                partner[min(g, h)] = max(g, h)
            g = arange[mutual]
            h = partner[mutual]
            gs.append(g)
            hs.append(h)
            free[g] = False
            free[h] = False
        if not gs:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        return torch.cat(gs), torch.cat(hs)

    def converge(self) -> int:
        """Greedy swap passes until no swap gains (or ``max_passes``); returns the number of passes."""
        passes = 0
        while self.cfg.max_passes is None or passes < self.cfg.max_passes:
            g, h = self._select_pairs()
            if g.numel() == 0:
                break
            i, j = self._best_swaps(g, h)
            real = self._exact_swap_gain(i, j)
            ok = real > self._abs_tol(g, h)
            # float32 gain that is really rounding noise: never apply it (keeps the search monotone,
            # hence finite); the pair is re-examined once one of its groups changes
            self.pair_best[g[~ok], h[~ok]] = -math.inf
            self.pair_best[h[~ok], g[~ok]] = -math.inf
            if ok.any():
                self.apply_swaps(i[ok], j[ok])
                self.stats["swaps"] += int(ok.sum())
            passes += 1
        self.stats["passes"] += passes
        return passes

    def _kick_loop(
        self, attempts: int, kick: Callable[[bool], bool], polish: bool, slack: float = 0.0
    ) -> int:
        """Shared loop of the escapes and the perturbations; returns how many attempts found a new best.

        Each attempt: ``kick(won)`` (``won``: whether the previous attempt found a new best) moves away
        from the current permutation, or returns False when it has nothing left to try, which ends the
        loop; the swap phase converges again. A new best (after a stripe/swap alternation when
        ``polish``) becomes the current permutation; so does a result losing less than ``slack``, which
        decays linearly to 0 over the attempts (threshold accepting; 0: only improvements are kept).
        Anything else returns to the current permutation from the undo log. The search ends on the best
        permutation seen.
        """
        best_perm, best_total = self.perm.clone(), self.total()
        current, current_total = best_perm, best_total
        self._undo = {}
        checked = self.checked.clone()  # stripe flags of the current state (valid again after a restore)
        wins, won = 0, False
        for attempt in range(attempts):
            if not kick(won):
                break
            self.converge()
            won = self.total() > best_total + self.tol
            if won and polish:
                self._stripe_phase()
            threshold = slack * (1 - attempt / attempts)
            if won or (threshold > 0 and self.total() > current_total - threshold):
                if won:
                    best_perm, best_total = self.perm.clone(), self.total()
                    wins += 1
                current, current_total = self.perm.clone(), self.total()
                self._undo = {}
                checked = self.checked.clone()
            else:
                self._restore(current)
                self.checked.copy_(checked)
        self._undo = None
        self.move_to(best_perm)
        return wins

    def escapes(self) -> None:
        """Forced small-loss swaps followed by greedy swaps; keep the best permutation seen."""
        tried = torch.zeros(self.G, self.G, dtype=torch.bool)
        upper = torch.ones(self.G, self.G, dtype=torch.bool).triu(1)

        def kick(won: bool) -> bool:
            if won:  # a new best: every pair may be tried again
                tried.zero_()
            candidates = self.pair_best.masked_fill(~upper | tried, -math.inf).flatten()
            pool = min(self.cfg.escape_pool, int(torch.isfinite(candidates).sum()))
            if pool == 0:
                return False
            top = candidates.topk(pool).indices
            pick = int(top[torch.randint(pool, (1,), generator=self.gen)])
            g, h = divmod(pick, self.G)
            tried[g, h] = True
            self.apply_swaps(*self._best_swaps(torch.tensor([g]), torch.tensor([h])))
            return True

        self.stats["escapes_won"] += self._kick_loop(self.cfg.escape_attempts, kick, polish=False)

    def perturb_round_count(self) -> int:
        """Rounds of the perturbation phase: ``perturb_rounds_per_group * G``, at most ``perturb_work // (R*D)``."""
        rounds = self.cfg.perturb_rounds_per_group * self.G
        if self.cfg.perturb_work is not None:
            rounds = min(rounds, self.cfg.perturb_work // (self.R * self.D))
        return rounds

    def perturbations(self) -> None:
        """Iterated local search: ``perturb_swaps`` random swaps from the best permutation, converge,
        polish a winner with the stripe/swap alternation; keep the best permutation seen."""
        m, D, k = self.m, self.D, self.cfg.perturb_swaps

        def kick(won: bool) -> bool:
            i = torch.randint(D, (k,), generator=self.gen)
            # uniform over the D - M positions outside i's group
            j = (i // m * m + m + torch.randint(D - m, (k,), generator=self.gen)) % D
            new_perm = self.perm.clone()
            for a, b in zip(i.tolist(), j.tolist(), strict=True):  # in turn: a position may recur
                new_perm[[a, b]] = new_perm[[b, a]]
            self.move_to(new_perm)
            return True

        rounds = self.perturb_round_count()
        slack = self.cfg.perturb_slack * self.total() / self.D  # in units of the mean kept score per channel
        self.stats["perturb_rounds"] += rounds
        self.stats["perturb_won"] += self._kick_loop(rounds, kick, polish=True, slack=slack)

    @functools.cached_property
    def _splits(self) -> tuple[Tensor, Tensor]:
        """Splits of a group pair's ``2M`` columns (first M = group A) that move >= 2 columns each way.

        Splits keeping the pair as is or moving one column each way are single swaps, already exhausted
        by the swap phase (the stripe search runs after it converges), so only the others (up to
        ``stripe_max_moved`` columns each way) are evaluated. The split is listed by the half holding
        column 0, so each unordered split appears once.
        """
        m = self.m
        cap = m if self.cfg.stripe_max_moved is None else self.cfg.stripe_max_moved
        left, right = [], []
        for c in itertools.combinations(range(2 * m), m):
            k_in = sum(x >= m for x in c)  # columns of B that join A; the split moves min(k, M - k)
            moved = min(k_in, m - k_in)
            if c[0] == 0 and 2 <= moved <= cap:
                left.append(c)
                right.append(tuple(x for x in range(2 * m) if x not in c))
        as_tensor = [torch.tensor(half, dtype=torch.long).reshape(-1, m) for half in (left, right)]
        return as_tensor[0], as_tensor[1]

    def stripe_round(self) -> bool:
        """Evaluate the most promising unchecked group pairs with every split; apply the best disjoint ones."""
        G, m, n = self.G, self.m, self.n
        left, right = self._splits
        n_splits = left.shape[0]
        if n_splits == 0:  # M <= 3: every split is a single swap
            return False
        upper = torch.ones(G, G, dtype=torch.bool).triu(1)
        # rank by best single-swap gain; pairs whose float32 gain was rejected as noise (-inf) come last
        cand = self.pair_best.clamp(min=-torch.finfo(torch.float32).max)
        cand = cand.masked_fill(~upper | self.checked, -math.inf).flatten()
        available = int(torch.isfinite(cand).sum())
        k = available if self.cfg.stripe_pairs is None else min(self.cfg.stripe_pairs, available)
        if self.cfg.stripe_budget is not None:
            k = min(k, max(1, self.cfg.stripe_budget // n_splits))
        if k == 0:
            return False
        flat = cand.topk(k).indices
        g, h = flat // G, flat % G
        chunk = max(1, (1 << 22) // (self.R * n_splits))  # about 2**22 scores per lane per chunk
        gains, choice = [], []
        for c0 in range(0, k, chunk):
            gc, hc = g[c0 : c0 + chunk], h[c0 : c0 + chunk]
            pos = torch.cat([gc[:, None] * m + torch.arange(m), hc[:, None] * m + torch.arange(m)], dim=1)
            x = self.ST[self.perm[pos.T]]  # (2M, B, R): contiguous rows, so every gather is a block copy
            kept = torch.zeros(n_splits, gc.numel(), dtype=torch.float64)
            for half in (left, right):
                lanes = _sort_desc([x[half[:, lane]] for lane in range(m)])  # M x (K, B, R)
                for lane in lanes[:n]:
                    kept += lane.sum(-1, dtype=torch.float64)  # (K, B)
            kept = kept.T
            best, arg = kept.max(dim=1)
            gains.append(best - self.kept_g[gc] - self.kept_g[hc])
            choice.append(arg)
        gain, split = torch.cat(gains), torch.cat(choice)
        self.stats["stripe_pairs"] += k
        self.checked[g, h] = True
        self.checked[h, g] = True
        order = torch.argsort(gain, descending=True, stable=True)
        used = torch.zeros(G, dtype=torch.bool)
        new_perm = self.perm.clone()
        moves = 0
        for t in order.tolist():
            if float(gain[t]) <= max(self.tol, float(self._abs_tol(g[t], h[t]))):
                break
            gt, ht = int(g[t]), int(h[t])
            if used[gt] or used[ht]:
                continue
            used[gt] = used[ht] = True
            chans = torch.cat([self.perm[gt * m : (gt + 1) * m], self.perm[ht * m : (ht + 1) * m]])
            new_perm[gt * m : (gt + 1) * m] = chans[left[split[t]]]
            new_perm[ht * m : (ht + 1) * m] = chans[right[split[t]]]
            moves += 1
        if moves:
            self.move_to(new_perm)
            self.stats["stripe_moves"] += moves
        return moves > 0

    def _stripe_phase(self) -> None:
        """Alternate stripe rounds and swap convergence until a round finds nothing (<= max_rounds)."""
        if not self.cfg.stripe_group:
            return
        for _ in range(self.cfg.max_rounds):
            if not self.stripe_round():
                break
            self.converge()

    def _log(self, phase: str, start_total: float, since: float) -> float:
        now = time.perf_counter()
        self.stats[f"gain_{phase}"] = self.total() - start_total
        self.stats[f"seconds_{phase}"] = now - since
        if self.cfg.progress:
            log.info(
                "%s: after %s (%.2f s): kept %+.6g over identity (%d swaps, %d stripe moves)",
                self.name,
                phase,
                now - since,
                self.total() - start_total,
                self.stats["swaps"],
                self.stats["stripe_moves"],
            )
        return now

    def run(self) -> Tensor:
        """Swap phase, stripe/swap alternation, escapes (stripe/swap again if they helped), perturbations."""
        start_total, clock = self.total(), self.t0
        self.converge()
        clock = self._log("swap", start_total, clock)
        self._stripe_phase()
        clock = self._log("stripe", start_total, clock)
        if self.cfg.escape_attempts:
            before = self.total()
            self.escapes()
            if self.total() > before:
                self._stripe_phase()
        clock = self._log("escape", start_total, clock)
        if self.perturb_round_count():
            self.perturbations()
        self._log("perturb", start_total, clock)
        return self.perm.clone()


def _batcher(lo: int, hi: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort of wires ``lo..hi`` (inclusive, power-of-two count)."""

    def merge(lo: int, hi: int, r: int) -> list[tuple[int, int]]:
        step = r * 2
        if step < hi - lo:
            return (
                merge(lo, hi, step)
                + merge(lo + r, hi, step)
                + [(i, i + r) for i in range(lo + r, hi - r, step)]
            )
        return [(lo, lo + r)]

    if hi <= lo:
        return []
    mid = lo + (hi - lo) // 2
    return _batcher(lo, mid) + _batcher(mid + 1, hi) + merge(lo, hi, 1)


@functools.cache
def _sorting_network(m: int) -> tuple[tuple[int, int], ...]:
    """A sorting network of ``m`` wires: Batcher's for the next power of two, with the comparators that
    touch the (virtual, -inf) padding wires dropped -- those never move anything."""
    size = 1 << max(0, (m - 1).bit_length())
    return tuple((i, j) for i, j in _batcher(0, size - 1) if j < m)


def _sort_desc(lanes: list[Tensor]) -> list[Tensor]:
    """Sort M same-shaped tensors elementwise in descending order (``out[0]`` = largest, ...).

    A sorting network of elementwise max/min is several times faster than ``topk``/``sort`` along a
    tiny last dimension on CPU.
    """
    lanes = list(lanes)
    for i, j in _sorting_network(len(lanes)):
        lanes[i], lanes[j] = torch.maximum(lanes[i], lanes[j]), torch.minimum(lanes[i], lanes[j])
    return lanes
