"""Prune a whole model: one pruner, one permutation method, every bound group of a binding spec.

The model keeps its original channel order: each linear gets ``W * M'[:, argsort(p)]`` where ``M'`` is
the N:M mask of the permuted scores (docs/method.md §3). The permutations are returned so that
export can fold them into the weights later.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from permsparse.errors import ConfigError
from permsparse.models.binding import BindingGroup, BindingSpec, get_spec
from permsparse.permutation.base import Identity, PermutationMethod, WrappedMethod, is_permutation
from permsparse.permutation.efficacy import efficacy_of, kept_ratio_of, kept_scores
from permsparse.permutation.residual import SharedResidual
from permsparse.sparsity.base import LayerStats, Pruner
from permsparse.sparsity.nm import NMPattern, check_nm, check_nm_shape

__all__ = ["GroupReport", "PruneReport", "group_scores", "prune_group", "prune_model", "prune_model_sequential",
           "check_model_divisible", "indivisible_layers", "skip_indivisible"]


@dataclass
class GroupReport:
    """What happened to one binding group."""

    name: str
    linears: list[str]
    perm: Tensor
    efficacy: float
    kept_ratio: float
    seconds: float


@dataclass
class PruneReport:
    """Per-group results of :func:`prune_model`; ``perms`` maps group name to its ``(d_in,)`` permutation."""

    pattern: NMPattern
    groups: list[GroupReport] = field(default_factory=list)

    @property
    def perms(self) -> dict[str, Tensor]:
        return {g.name: g.perm for g in self.groups}

    @property
    def mean_efficacy(self) -> float:
        return sum(g.efficacy for g in self.groups) / max(len(self.groups), 1)

    @property
    def mean_kept_ratio(self) -> float:
        return sum(g.kept_ratio for g in self.groups) / max(len(self.groups), 1)

    def to_dict(self) -> dict:
        return {
            "pattern": str(self.pattern),
            "mean_efficacy": self.mean_efficacy,
            "mean_kept_ratio": self.mean_kept_ratio,
            "groups": {
                g.name: {"linears": g.linears, "efficacy": g.efficacy, "kept_ratio": g.kept_ratio, "seconds": g.seconds}
                for g in self.groups
            },
        }


def indivisible_layers(model: nn.Module, groups: Iterable[BindingGroup], pattern: NMPattern, channel_groups: int = 1,
                       foldable: bool = False, check: Callable[[int, str], object] | None = None) -> list[str]:
    """One line per bound linear that cannot be pruned as asked: ``d_in`` not divisible by M, or by the group
    count times M (``channel_groups``; attention-output groups under ``foldable`` are split by heads instead), or
    refused by ``check(d_in, name)`` (a ``ValueError``, e.g. the learned method's ``blocks_for``)."""
    by_heads_of = None
    if foldable:
        from permsparse.permutation.foldable import is_head_restricted as by_heads_of
    problems: list[str] = []
    for group in groups:
        by_heads = by_heads_of is not None and by_heads_of(group)
        for name in group.linears:
            weight = model.get_submodule(name).weight
            try:
                check_nm_shape(weight.shape, pattern, name)
            except ValueError as err:
                problems.append(str(err))
                continue
            d_in = int(weight.shape[1])
            if by_heads:
                continue
            if d_in % (channel_groups * pattern.m):
                problems.append(f"{name}: d_in={d_in} is not divisible by groups x M = {channel_groups} x "
                                f"{pattern.m}; choose perm.method.groups dividing {d_in // pattern.m}")
            elif check is not None:
                try:
                    check(d_in, name)
                except ValueError as err:
                    problems.append(str(err))
    return problems


def check_model_divisible(model: nn.Module, groups: Iterable[BindingGroup], pattern: NMPattern,
                          channel_groups: int = 1, foldable: bool = False,
                          check: Callable[[int, str], object] | None = None) -> None:
    """Raise one :class:`~permsparse.errors.ConfigError` that lists every bound layer whose ``d_in`` is not
    divisible by M (or by the group count), naming the model class, each layer and what it lacks
    (:func:`indivisible_layers`).

    ``foldable`` (``perm.foldable``): attention-output groups are split by heads instead of ``channel_groups``,
    so they need ``head_dim`` divisible by M instead.
    """
    groups = list(groups)
    if foldable:
        from permsparse.permutation.foldable import check_foldable

        check_foldable(groups, pattern)
    problems = indivisible_layers(model, groups, pattern, channel_groups, foldable, check)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            f"{type(model).__name__}: {len(problems)} bound layer(s) cannot be pruned to {pattern}:\n{lines}\n"
            f"Every bound linear needs d_in divisible by M={pattern.m} (and by the group count x M); choose a "
            "pattern and groups that divide them, a binding spec that leaves these layers out, or "
            "prune.skip_indivisible=true to keep them (their whole binding groups) dense and unpermuted"
        )


def skip_indivisible(model: nn.Module, pattern: NMPattern, channel_groups: int = 1, foldable: bool = False,
                     check: Callable[[int, str], object] | None = None) -> dict[str, dict[str, list[str]]]:
    """``prune.skip_indivisible=true``: mark every binding group with a member that :func:`indivisible_layers` names
    to stay dense and unpermuted (:func:`~permsparse.models.binding.leave_dense`), so that every later
    ``get_spec(model)`` (pruning, calibration, learning, export) leaves it out. Returns ``{group: {"linears": [...],
    "reasons": [...]}}`` of the groups skipped now (empty when every layer divides).

    The whole group is skipped, never one member: a group is the unit that owns one permutation (chosen on its
    members' stacked scores, learned as one cost, folded into one producer or gathered once), and its members read
    one tensor, so they share ``d_in`` and with it every divisibility; a partly pruned group has no meaning here.
    """
    from permsparse.models.binding import leave_dense

    skipped: dict[str, dict[str, list[str]]] = {}
    for group in get_spec(model).groups(model):
        problems = indivisible_layers(model, [group], pattern, channel_groups, foldable, check)
        if problems:
            skipped[group.name] = {"linears": list(group.linears), "reasons": problems}
    if skipped:
        leave_dense(model, {name: "; ".join(info["reasons"]) for name, info in skipped.items()})
    return skipped


def group_scores(model: nn.Module, group: BindingGroup, pruner: Pruner,
                 stats: Mapping[str, LayerStats] | None) -> Tensor:
    """The pruner's scores of every linear in ``group``, stacked along the output dimension (float32)."""
    parts = []
    for name in group.linears:
        weight = model.get_submodule(name).weight.detach().float()
        parts.append(pruner.score(weight, None if stats is None else stats.get(name)).float())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def prune_group(
    model: nn.Module,
    group: BindingGroup,
    pruner: Pruner,
    pattern: NMPattern,
    permutation: PermutationMethod | Tensor,
    stats: Mapping[str, LayerStats] | None = None,
) -> GroupReport:
    """Choose (or take) the group's permutation, then mask every bound linear in place, original order."""
    start = time.perf_counter()
    scores = group_scores(model, group, pruner, stats)
    if isinstance(permutation, Tensor):
        perm = permutation.to(scores.device).long()
    else:
        perm = permutation.find_group(scores, pattern, group).long()
    if not is_permutation(perm, scores.shape[1]):
        raise ValueError(f"{group.name}: the permutation method returned a non-bijection of {scores.shape[1]} channels")
    for name in group.linears:
        linear = model.get_submodule(name)
        weight = linear.weight
        result = pruner.prune(weight.detach().float(), None if stats is None else stats.get(name), pattern, perm, name)
        new = (result.weight if result.weight is not None else weight.detach().float()) * result.mask
        weight.copy_(new.to(weight.dtype))
        check_nm(weight[:, perm], pattern, name)
    kept = kept_scores(scores, perm, pattern, group.name)
    return GroupReport(
        name=group.name,
        linears=list(group.linears),
        perm=perm.cpu(),
        efficacy=efficacy_of(kept),
        kept_ratio=kept_ratio_of(kept),
        seconds=time.perf_counter() - start,
    )


def prune_model(
    model: nn.Module,
    pruner: Pruner,
    pattern: NMPattern | str,
    permutation: PermutationMethod | Mapping[str, Tensor] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
    spec: BindingSpec | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune every bound linear of ``model`` in place to N:M, choosing one permutation per binding group.

    ``permutation`` is a method (``find`` per group), a mapping ``group name -> perm`` (e.g. learned
    permutations), or ``None`` for the identity. ``stats`` come from
    :func:`permsparse.sparsity.calibration.collect_stats` when the pruner needs them.
    """
    pattern = NMPattern.parse(pattern)
    spec = spec or get_spec(model)
    groups = spec.groups(model)
    check_model_divisible(model, groups, pattern)
    if (pruner.needs_stats or pruner.needs_hessian) and stats is None:
        raise ValueError(f"pruner {type(pruner).__name__} needs calibration statistics; pass stats=collect_stats(...)")
    shared = _shared_residual(permutation)
    if shared is not None:  # perm.residual=shared: one permutation for all residual readers, from the dense scores
        shared.prepare(groups, lambda g: group_scores(model, g, pruner, stats), pattern)
    report = PruneReport(pattern)
    for group in tqdm(groups, desc=f"prune {pattern}", disable=not progress):
        report.groups.append(prune_group(model, group, pruner, pattern, _perm_for(permutation, group), stats))
    return report


def _shared_residual(permutation: object) -> SharedResidual | None:
    """The :class:`SharedResidual` in a chain of wrappers (``HeadRestricted(SharedResidual(...))``...), if any."""
    while isinstance(permutation, WrappedMethod):
        if isinstance(permutation, SharedResidual):
            return permutation
        permutation = permutation.method
    return None


def _perm_for(permutation: PermutationMethod | Mapping[str, Tensor] | None,
              group: BindingGroup) -> PermutationMethod | Tensor:
    if permutation is None:
        return Identity()
    if isinstance(permutation, PermutationMethod):
        return permutation
    if group.name not in permutation:
        raise ValueError(f"no permutation given for binding group {group.name!r}")
    return permutation[group.name]


def prune_model_sequential(
    model: nn.Module,
    pruner: Pruner,
    pattern: NMPattern | str,
    batches: Iterable,
    permutation: PermutationMethod | Mapping[str, Tensor] | None = None,
    spec: BindingSpec | None = None,
    forward: Callable | None = None,
    progress: bool = True,
) -> PruneReport:
    """Block-by-block pruning as published for Wanda/SparseGPT: block ``l`` is calibrated on the output
    of the already-pruned blocks ``< l``, then pruned, before block ``l + 1`` is calibrated."""
    from permsparse.sparsity.calibration import collect_stats_sequential

    if _shared_residual(permutation) is not None:
        raise ValueError("perm.residual=shared is not supported with sequential calibration "
                         "(calibration.sequential=true): the shared residual-stream permutation is chosen once from "
                         "the scores of all residual-reading groups, which sequential pruning only knows block by "
                         "block; use calibration.sequential=false or perm.residual=per_layer")
    pattern = NMPattern.parse(pattern)
    spec = spec or get_spec(model)
    groups = spec.groups(model)
    check_model_divisible(model, groups, pattern)
    by_block: dict[int, list[BindingGroup]] = {}
    for group in groups:
        by_block.setdefault(group.block, []).append(group)
    report = PruneReport(pattern)

    def on_block(index: int, stats: Mapping[str, LayerStats]) -> None:
        for group in by_block.get(index, []):
            report.groups.append(prune_group(model, group, pruner, pattern, _perm_for(permutation, group), stats))

    collect_stats_sequential(
        model,
        spec.blocks(model),
        [[n for g in by_block.get(i, []) for n in g.linears] for i in range(len(spec.blocks(model)))],
        batches,
        on_block,
        hessian=pruner.needs_hessian,
        forward=forward,
        progress=progress,
    )
    return report
