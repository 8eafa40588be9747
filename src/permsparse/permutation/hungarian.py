"""Hardening a soft assignment: Hungarian matching per group and the straight-through estimator."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from permsparse.permutation.base import invert

__all__ = ["hungarian", "perm_to_matrix", "straight_through"]


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1), thread_name_prefix="hungarian")


def hungarian(scores: Tensor, maximize: bool = True) -> Tensor:
    """Best assignment per group of a ``(G, g, g)`` (or ``(g, g)``) matrix, as permutations ``(G, g)``.

    ``scores[k, i, j]`` rates sending original channel ``i`` to position ``j``; the result ``perm``
    follows the package convention ``perm[k, j] = i`` (position ``j`` holds channel ``i``).
    """
    single = scores.dim() == 2
    batch = scores.unsqueeze(0) if single else scores
    if batch.dim() != 3 or batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"hungarian needs (G, g, g) square matrices, got shape {tuple(scores.shape)}")
    batch = batch.detach()
    # A sum is finite iff every entry is (or it overflowed: then look closer); one pass instead of a bool copy.
    if not torch.isfinite(batch.sum()) and not torch.isfinite(batch).all():
        raise ValueError("hungarian: the assignment matrix contains NaN or Inf")
    # Shortcut, exact: if every row's best column is distinct, that assignment attains the sum of the row
    # optima, an upper (lower, when minimising) bound on any assignment, so it is optimal. Near the end of
    # annealing many groups qualify and scipy is only called for the rest.
    best = batch.argmax(-1) if maximize else batch.argmin(-1)  # first best column on ties, as numpy's
    g = batch.shape[-1]
    is_bijection = (best.sort(-1).values == torch.arange(g, device=best.device)).all(-1)
    cols = best.cpu().numpy().copy()
    todo = torch.nonzero(~is_bijection).flatten().tolist()
    mats = batch.cpu().numpy() if todo else None

    def solve(k: int) -> tuple[np.ndarray, np.ndarray]:
        # scipy solves in float64: the block is widened (exactly) in the worker, by numpy. No torch op may run in
        # a worker: each thread would start its own OpenMP team, whose spinning slows every later op.
        return linear_sum_assignment(mats[k].astype(np.float64), maximize=maximize)

    if len(todo) > 1 and torch.get_num_threads() > 1:
        # scipy's solver releases the GIL, so blocks are solved side by side (1.8x on 2 cores).
        results = _pool().map(solve, todo)
    else:
        results = map(solve, todo)
    for k, (rows, col) in zip(todo, results, strict=True):
        cols[k, rows] = col
    # cols[k, i] = position of channel i; the package convention wants its inverse.
    perm = invert(torch.from_numpy(cols)).to(scores.device)
    return perm[0] if single else perm


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
