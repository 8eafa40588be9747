"""The permutation-method interface and helpers for permutations as index tensors.

A permutation of a layer's ``d_in`` input channels is a ``LongTensor`` ``perm`` of shape ``(d_in,)``
with ``W' = W[:, perm]``: position ``j`` of the permuted layer holds original channel ``perm[j]``.
A block-diagonal (group-wise) permutation is stored as ``(G, g)`` local indices, ``g = d_in / G``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from permsparse.sparsity.nm import NMPattern, check_nm_scores

if TYPE_CHECKING:
    from permsparse.models.binding import BindingGroup

__all__ = [
    "PermutationMethod",
    "WrappedMethod",
    "Identity",
    "is_permutation",
    "invert",
    "block_to_global",
    "global_to_block",
    "find_block_diagonal",
]


class PermutationMethod(ABC):
    """Chooses one input permutation for a binding group from its concatenated scores.

    ``scores`` is ``(sum of d_out over the bound layers, d_in)``: the scores of every layer that
    reads the same input, stacked along the output dimension.
    """

    @abstractmethod
    def find(self, scores: Tensor, pattern: NMPattern, name: str = "group") -> Tensor:
        """Return ``perm`` of shape ``(d_in,)`` (long, a bijection of ``range(d_in)``)."""

    def find_group(self, scores: Tensor, pattern: NMPattern, group: BindingGroup) -> Tensor:
        """:meth:`find` for one binding group; what :func:`~permsparse.prune.prune_model` calls.

        Methods that need the group's structure (e.g. the head layout of an attention output projection,
        :class:`~permsparse.permutation.foldable.HeadRestricted`) override this; the default ignores it.
        """
        return self.find(scores, pattern, name=group.name)

    @staticmethod
    def check_scores(scores: Tensor, pattern: NMPattern | str, name: str = "group") -> NMPattern:
        """Validate ``scores`` for a search under ``pattern`` (shape, finiteness); return the parsed pattern."""
        pattern = NMPattern.parse(pattern)
        check_nm_scores(scores, pattern, name, purpose="search a permutation")
        return pattern


class WrappedMethod(PermutationMethod):
    """Base of wrappers that change the permutation of some groups and delegate the rest to ``method``
    (:class:`~permsparse.permutation.foldable.HeadRestricted`, :class:`~permsparse.permutation.residual.SharedResidual`).
    Attributes the wrapper lacks (e.g. RIA's ``fallbacks`` counter) are read through to the wrapped method."""

    def __init__(self, method: PermutationMethod) -> None:
        self.method = method

    def find(self, scores: Tensor, pattern: NMPattern, name: str = "group") -> Tensor:
        return self.method.find(scores, pattern, name)

    def find_group(self, scores: Tensor, pattern: NMPattern, group: BindingGroup) -> Tensor:
        return self.method.find_group(scores, pattern, group)

    def __getattr__(self, name: str) -> Any:
        if name == "method":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.method, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method!r})"


class Identity(PermutationMethod):
    """No permutation: plain N:M pruning in the original channel order."""

    def find(self, scores: Tensor, pattern: NMPattern, name: str = "group") -> Tensor:
        return torch.arange(scores.shape[1], device=scores.device)


def is_permutation(perm: Tensor, n: int | None = None) -> bool:
    """True if ``perm`` (1-D, or ``(G, g)`` rows) is a bijection of ``range(n)``."""
    if perm.dim() == 2:
        return all(is_permutation(row, perm.shape[1]) for row in perm)
    n = perm.numel() if n is None else n
    if perm.dim() != 1 or perm.numel() != n:
        return False
    return bool(torch.equal(torch.sort(perm.long()).values, torch.arange(n, device=perm.device)))


def invert(perm: Tensor) -> Tensor:
    """``argsort(perm)``: the permutation that undoes ``perm`` (works batched over leading dims)."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return inv


def block_to_global(local: Tensor) -> Tensor:
    """``(G, g)`` per-group permutations to one ``(G * g,)`` permutation of the whole layer."""
    groups, size = local.shape
    offsets = torch.arange(groups, device=local.device).unsqueeze(1) * size
    return (local + offsets).reshape(-1)


def global_to_block(perm: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`block_to_global`; raises if ``perm`` moves a channel across groups."""
    size = perm.numel() // groups
    local = perm.reshape(groups, size) - torch.arange(groups, device=perm.device).unsqueeze(1) * size
    if (local < 0).any() or (local >= size).any():
        raise ValueError(f"permutation is not block-diagonal with {groups} groups of {size} channels")
    return local


def find_block_diagonal(method: PermutationMethod, scores: Tensor, pattern: NMPattern | str, groups: int,
                        name: str = "group") -> Tensor:
    """``method`` run inside each of ``groups`` contiguous channel blocks of ``scores`` ``(d_out, d_in)``: a
    block-diagonal ``(d_in,)`` permutation (the start the learned method takes with ``init=ria|greedy``)."""
    pattern = NMPattern.parse(pattern)
    size = scores.shape[1] // groups
    local = torch.stack([method.find(scores[:, k * size:(k + 1) * size], pattern, name=f"{name}[block {k}]").long()
                         for k in range(groups)])
    return block_to_global(local)
