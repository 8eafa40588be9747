"""Hardening a soft assignment: Hungarian matching per group and the straight-through estimator."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from permsparse.permutation.base import invert

__all__ = ["hungarian", "hungarian_many", "perm_to_matrix", "straight_through"]


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1), thread_name_prefix="hungarian")


def hungarian(scores: Tensor, maximize: bool = True) -> Tensor:
    """Best assignment per group of a ``(G, g, g)`` (or ``(g, g)``) matrix, as permutations ``(G, g)``.

    ``scores[k, i, j]`` rates sending original channel ``i`` to position ``j``; the result ``perm``
    follows the package convention ``perm[k, j] = i`` (position ``j`` holds channel ``i``).
    """
    if scores.dim() not in (2, 3) or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"hungarian needs (G, g, g) square matrices, got shape {tuple(scores.shape)}")
    single = scores.dim() == 2
    perm = hungarian_many([scores.unsqueeze(0) if single else scores], maximize)[0]
    return perm[0] if single else perm


def hungarian_many(batches: Sequence[Tensor], maximize: bool = True) -> list[Tensor]:
    """:func:`hungarian` of several ``(G, g, g)`` tensors (sizes may differ), with every block that needs scipy
    solved in one pass of the solver threads: one hand-off instead of one per tensor (SmolLM2 has 20 stacks a
    step)."""
    for batch in batches:
        if batch.dim() != 3 or batch.shape[-1] != batch.shape[-2]:
            raise ValueError(f"hungarian needs (G, g, g) square matrices, got shape {tuple(batch.shape)}")
    all_cols, mats, todo = [], [], []
    for index, batch in enumerate(batches):
        batch = batch.detach()
        # A sum is finite iff every entry is (or it overflowed: then look closer); one pass, not a bool copy.
        if not torch.isfinite(batch.sum()) and not torch.isfinite(batch).all():
            raise ValueError("hungarian: the assignment matrix contains NaN or Inf")
        # Shortcut, exact: if every row's best column is distinct, that assignment attains the sum of the row
        # optima, an upper (lower, when minimising) bound on any assignment, so it is optimal. Near the end of
        # annealing many groups qualify and scipy is only called for the rest.
        best = batch.argmax(-1) if maximize else batch.argmin(-1)  # first best column on ties, as numpy's
        g = batch.shape[-1]
        is_bijection = (best.sort(-1).values == torch.arange(g, device=best.device)).all(-1)
        all_cols.append(best.cpu().numpy().copy())
        blocks = torch.nonzero(~is_bijection).flatten().tolist()
        exact = batch.dtype if batch.dtype in (torch.float32, torch.float64) else torch.float32  # numpy has no bf16
        mats.append(batch.to("cpu", exact).numpy() if blocks else None)
        todo += [(index, k) for k in blocks]

    def solve(job: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        # scipy solves in float64: the block is widened (exactly) in the worker, by numpy. No torch op may run in
        # a worker: each thread would start its own OpenMP team, whose spinning slows every later op.
        index, k = job
        return linear_sum_assignment(mats[index][k].astype(np.float64), maximize=maximize)

    if len(todo) > 1 and torch.get_num_threads() > 1:
        # scipy's solver releases the GIL, so blocks are solved side by side (1.8x on 2 cores).
        results = _pool().map(solve, todo)
    else:
        results = map(solve, todo)
    for (index, k), (rows, col) in zip(todo, results, strict=True):
        all_cols[index][k, rows] = col
    # cols[k, i] = position of channel i; the package convention wants its inverse.
    return [invert(torch.from_numpy(cols)).to(batch.device) for cols, batch in zip(all_cols, batches, strict=True)]


def perm_to_matrix(perm: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(G, g)`` permutations to ``(G, g, g)`` 0/1 matrices ``P`` with ``W @ P == W[:, perm]`` per group."""
    g = perm.shape[-1]
    mat = torch.zeros(*perm.shape, g, dtype=dtype, device=perm.device)
    # P[i, j] = 1 where i = perm[j]: scatter along the row dimension.
    mat.scatter_(-2, perm.unsqueeze(-2), 1.0)
    return mat


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value ``hard``, gradient of ``soft``: ``hard + soft - soft.detach()``."""
    return hard + soft - soft.detach()
