"""``perm.residual=shared``: one permutation of the residual stream for every group that reads it.

Export can fold the input permutations of the residual-reading groups (``q,k,v`` / ``qkv``, ``gate,up``,
``fc1``; producer type ``residual``) only if they are all the same permutation ``p``: the residual stream
is then stored permuted (:func:`permsparse.export.residual.fold_residual_permutation`) and no runtime
gather is needed. :class:`SharedResidual` chooses that one ``p``.

Objective (the same reasoning as :class:`~permsparse.permutation.foldable.HeadRestricted`): with one
permutation for all of them, the score kept by those groups together is ``sum_g kept(S_g[:, p])``, and kept
score is a sum over output rows, so that is exactly ``kept(stack_g S_g [:, p])`` with every residual
group's scores **stacked along the rows**. The wrapped heuristic (greedy channel swap, RIA CP, ...) runs
unchanged, once, on that ``(sum_g d_out_g, hidden)`` matrix and optimises the true objective of the tied
problem; never less than the identity's if the wrapped method never is. Other groups are searched by the
wrapped method as before. The stacked matrix has ``sum of d_out`` of all residual readers as rows: cheap
for small models, large for 7B ones (every q/k/v/gate/up row of every layer), which the greedy swap and
RIA's assignment then process once.

The scores must all be known before any group is pruned, so this needs statistics of the dense model
(``calibration.sequential=false``); :func:`~permsparse.prune.prune_model` calls :meth:`SharedResidual.prepare`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from permsparse.models.binding import BindingGroup, ResidualStream
from permsparse.permutation.base import PermutationMethod, WrappedMethod, is_permutation
from permsparse.sparsity.nm import NMPattern

__all__ = ["SharedResidual", "find_shared_residual", "is_residual", "shared_residual_if", "RESIDUAL_KEY",
           "RESIDUAL_CHOICES"]

RESIDUAL_KEY = "perm.residual"
RESIDUAL_CHOICES = ("per_layer", "shared")


def is_residual(group: BindingGroup) -> bool:
    """True for the groups that read the residual stream (producer :class:`ResidualStream`)."""
    return isinstance(group.producer, ResidualStream)


def find_shared_residual(method: PermutationMethod, scores: Sequence[Tensor], pattern: NMPattern | str,
                         name: str = "residual stream") -> Tensor:
    """One permutation for all residual-reading groups: ``method.find`` on their row-stacked ``scores``."""
    if not scores:
        raise ValueError("find_shared_residual needs the scores of at least one residual-reading group")
    widths = {int(s.shape[1]) for s in scores}
    if len(widths) != 1:
        raise ValueError(f"residual-reading groups have different input widths {sorted(widths)}; "
                         "they cannot share one residual-stream permutation")
    stacked = torch.cat([s.float() for s in scores], dim=0)
    pattern = method.check_scores(stacked, pattern, name)
    perm = method.find(stacked, pattern, name=name).long()
    if not is_permutation(perm, stacked.shape[1]):
        raise ValueError(f"{name}: the permutation method returned a non-bijection of {stacked.shape[1]} channels")
    return perm


class SharedResidual(WrappedMethod):
    """Wrap a heuristic so that every residual-reading group gets the same permutation (``perm.residual=shared``).

    :meth:`prepare` (called by :func:`~permsparse.prune.prune_model` before any group is pruned) scores all
    residual-reading groups and runs the wrapped method once on their row-stacked scores
    (:func:`find_shared_residual`); :meth:`find_group` then returns that permutation for them, and the wrapped
    method's (e.g. :class:`~permsparse.permutation.foldable.HeadRestricted`'s) for every other group.
    """

    def __init__(self, method: PermutationMethod) -> None:
        super().__init__(method)
        self.perm: Tensor | None = None

    def prepare(self, groups: Sequence[BindingGroup], scores_of: Callable[[BindingGroup], Tensor],
                pattern: NMPattern | str) -> Tensor | None:
        """Choose the shared permutation from ``scores_of(group)`` of every residual-reading group in ``groups``."""
        residual = [g for g in groups if is_residual(g)]
        self.perm = None
        if residual:
            self.perm = find_shared_residual(self.method, [scores_of(g) for g in residual], pattern).cpu()
        return self.perm

    def find_group(self, scores: Tensor, pattern: NMPattern, group: BindingGroup) -> Tensor:
        if not is_residual(group):
            return self.method.find_group(scores, pattern, group)
        if self.perm is None:
            raise RuntimeError(f"{group.name}: SharedResidual.prepare was not called (perm.residual=shared needs "
                               "prune_model with statistics of the dense model, calibration.sequential=false)")
        if self.perm.numel() != scores.shape[1]:
            raise ValueError(f"{group.name}: shared residual permutation has {self.perm.numel()} channels, "
                             f"the group reads {scores.shape[1]}")
        return self.perm.to(scores.device)


def shared_residual_if(method: PermutationMethod, residual: str) -> PermutationMethod:
    """``SharedResidual(method)`` for ``perm.residual=shared``, ``method`` itself for ``per_layer``."""
    if residual not in RESIDUAL_CHOICES:
        raise ValueError(f"{RESIDUAL_KEY}={residual!r} is invalid; choose one of {list(RESIDUAL_CHOICES)}")
    return SharedResidual(method) if residual == "shared" else method


