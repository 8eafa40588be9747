"""``perm.foldable=true``: attention-output permutations restricted so that export can always fold them.

The input permutation of ``o_proj`` / ``attn.proj`` (binding groups whose producer is
:class:`~permsparse.models.binding.ValueRows`) folds into the value rows of ``v`` only if it maps every head's
``head_dim`` block onto itself and, with grouped-query attention, is the same for the query heads that share
one kv head (they read the same ``v`` rows; docs/method.md §6, :mod:`permsparse.permutation.heads`). Other groups
are unaffected. :func:`is_foldable` says, for any group and permutation, whether export can fold it.

**Heuristics** (:class:`HeadRestricted`, wrapping greedy CP, RIA CP, ...): one local permutation ``pi_j`` of
the ``head_dim`` channels is chosen per kv head ``j`` and applied to each of its ``rep = num_heads /
num_kv_heads`` query heads. With ``M | head_dim`` every N:M block of the permuted layer lies inside one head,
so the score kept by the whole layer is ``sum_j sum_{h in kv group j} kept(S_h[:, pi_j])`` (``S_h``: the
scores of head ``h``'s input columns, all output rows). Kept score is a sum over rows, so the inner sum is
exactly ``kept(stack_h S_h [:, pi_j])`` with the tied heads' column blocks **stacked along the rows**: the
method runs unchanged on that ``(rep * d_out, head_dim)`` matrix, one search per kv head, and optimises the
true objective of the tied problem. (Summing the tied heads' scores elementwise would not: the top-N of a
sum is not the sum of top-Ns; concatenating their columns would search a permutation of ``rep * head_dim``
channels that is not tied.) Each search never keeps less than its identity, so neither does the whole.

**The learned method** ties its costs instead (``LearnedPermutations(..., foldable=True)``: ``num_heads``
groups of ``head_dim`` channels whose costs are shared per kv head, :class:`~permsparse.permutation.cost.
LearnableCost` with ``tie``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from permsparse.errors import ConfigError
from permsparse.models.binding import (
    BindingGroup,
    Discovered,
    OutputRows,
    ResidualStream,
    SecondStream,
    ValueRows,
)
from permsparse.permutation.base import PermutationMethod, WrappedMethod
from permsparse.permutation.heads import as_perm, expand_kv_head_perms, kv_head_perms
from permsparse.sparsity.nm import NMPattern

__all__ = ["HeadRestricted", "find_within_heads", "head_layout", "is_head_restricted", "check_foldable",
           "is_foldable", "restrict_if_foldable", "FOLDABLE_KEY", "RESIDUAL_REASON"]

FOLDABLE_KEY = "perm.foldable"

RESIDUAL_REASON = (
    "input is the normalised residual stream and the residual-reading groups do not share one permutation "
    "(folding needs one global residual-stream permutation: perm.residual=shared); a runtime gather is inserted"
)


def is_head_restricted(group: BindingGroup) -> bool:
    """True for the groups ``perm.foldable`` restricts: attention output projections (producer ``ValueRows``)."""
    return isinstance(group.producer, ValueRows)


def head_layout(group: BindingGroup) -> tuple[int, int, int]:
    """``(head_dim, num_heads, num_kv_heads)`` of a group whose producer is :class:`ValueRows`."""
    if not isinstance(group.producer, ValueRows):
        raise ValueError(f"{group.name}: producer {group.producer.kind!r} has no head layout")
    return group.producer.head_layout


def is_foldable(group: BindingGroup, perm: Tensor) -> tuple[bool, str]:
    """Whether ``group``'s input permutation can be folded into its producer, and why (one line).

    Residual-stream groups are not foldable one by one (that needs one global residual-stream permutation shared
    by all of them, which :func:`~permsparse.export.fold.plan_fold` detects); :class:`OutputRows` producers always
    are; :class:`ValueRows` (attention output) only within heads, identical across the query heads of one kv head.
    The identity is trivially foldable.
    """
    perm = as_perm(perm)
    if torch.equal(perm, torch.arange(perm.numel())):
        return True, "identity permutation: nothing to fold or gather"
    producer = group.producer
    if isinstance(producer, ResidualStream):
        return False, RESIDUAL_REASON
    if isinstance(producer, OutputRows):
        mods = ", ".join(m.rsplit(".", 1)[-1] for m in producer.modules)
        parts = f" (each of its {producer.chunks} fused parts)" if producer.chunks > 1 else ""
        return True, f"folded into the output rows of {mods}{parts} (elementwise function in between)"
    if isinstance(producer, ValueRows):
        local, why = kv_head_perms(perm, *producer.head_layout)
        if local is None:
            return False, f"{why}; a runtime gather is needed"
        return True, f"within-head permutation folded into the value rows of {producer.module.rsplit('.', 1)[-1]}"
    if isinstance(producer, SecondStream):
        return False, (f"input is the normalised residual stream of the {producer.stream or 'second tower'}, not the "
                       "model's main one: a shared residual-stream permutation (perm.residual=shared) is folded into "
                       "the main stream only; a runtime gather is inserted")
    if isinstance(producer, Discovered):
        return False, (f"binding discovered from a forward pass of {producer.model_class or 'the model'} (no explicit "
                       "spec): folding knowledge missing (who produces this input is unknown); a runtime gather is "
                       "inserted")
    return False, (f"producer type {producer.kind!r}: the input is not produced by foldable rows; "
                   "a runtime gather is needed")


def _check_group(group: BindingGroup, pattern: NMPattern, d_in: int | None = None) -> tuple[int, int, int]:
    head_dim, num_heads, num_kv_heads = head_layout(group)
    if num_heads % num_kv_heads:
        raise ConfigError(f"{FOLDABLE_KEY}=true: {group.name} has num_heads={num_heads}, not a multiple of "
                          f"num_kv_heads={num_kv_heads}; set {FOLDABLE_KEY}=false")
    if head_dim % pattern.m:
        raise ConfigError(f"{FOLDABLE_KEY}=true needs head_dim divisible by M: {group.name} has head_dim={head_dim}, "
                          f"M={pattern.m} (an N:M block would straddle two heads); set {FOLDABLE_KEY}=false or "
                          "choose a pattern whose M divides head_dim")
    if d_in is not None and d_in != num_heads * head_dim:
        raise ConfigError(f"{FOLDABLE_KEY}=true: {group.name} has d_in={d_in} but its heads give {num_heads} x "
                          f"{head_dim}; the binding spec's head layout is wrong for this model")
    return head_dim, num_heads, num_kv_heads


def check_foldable(groups: Iterable[BindingGroup], pattern: NMPattern | str) -> None:
    """Raise :class:`~permsparse.errors.ConfigError` (naming ``perm.foldable``) if a ``ValueRows`` group cannot be
    restricted to heads under ``pattern`` (``head_dim`` not divisible by M, or heads not a multiple of kv heads)."""
    pattern = NMPattern.parse(pattern)
    for group in groups:
        if is_head_restricted(group):
            _check_group(group, pattern)


def find_within_heads(method: PermutationMethod, scores: Tensor, pattern: NMPattern | str,
                      group: BindingGroup) -> Tensor:
    """A foldable permutation of a ``v_rows`` group: ``method`` run once per kv head on the row-stacked scores
    of the query heads sharing it, expanded to all ``num_heads * head_dim`` channels (see the module docstring)."""
    pattern = method.check_scores(scores, pattern, group.name)
    head_dim, num_heads, num_kv_heads = _check_group(group, pattern, scores.shape[1])
    rep = num_heads // num_kv_heads
    d_out = scores.shape[0]
    # (d_out, kv, rep, hd) -> (kv, rep, d_out, hd) -> (kv, rep * d_out, hd): tied heads' column blocks stacked by rows
    stacked = scores.reshape(d_out, num_kv_heads, rep, head_dim).permute(1, 2, 0, 3).reshape(
        num_kv_heads, rep * d_out, head_dim)
    local = torch.stack([method.find(stacked[j], pattern, name=f"{group.name}[kv head {j}]").long().cpu()
                         for j in range(num_kv_heads)])
    return expand_kv_head_perms(local, num_heads).to(scores.device)


class HeadRestricted(WrappedMethod):
    """Wrap a heuristic so that attention-output groups get foldable permutations (``perm.foldable=true``).

    ``find_group`` runs :func:`find_within_heads` on ``v_rows`` groups and the wrapped method unchanged on every
    other group; ``find`` (no group structure known) is the wrapped method's.
    """

    def find_group(self, scores: Tensor, pattern: NMPattern, group: BindingGroup) -> Tensor:
        if is_head_restricted(group):
            return find_within_heads(self.method, scores, pattern, group)
        return self.method.find_group(scores, pattern, group)


def restrict_if_foldable(method: PermutationMethod, foldable: bool) -> PermutationMethod:
    """``HeadRestricted(method)`` when ``foldable`` (``perm.foldable``), else ``method`` itself."""
    return HeadRestricted(method) if foldable else method
