"""Fold learned input permutations into the weights: the deployed model stores ``W[:, perm]`` (truly N:M).

``prune_model`` leaves every linear in its original channel order, masked as ``W * M'[:, argsort(p)]``
(docs/method.md §3). Deployment needs the real reorder (§6): every bound linear stores
``W[:, p]`` and must *receive* ``x[..., p]``. Per binding group that input is produced

* by the output rows of other linears through an elementwise function (``down`` after ``gate``/``up``,
  ``fc2`` after ``fc1``): permute those rows (and biases) by ``p`` -- exact and free (**folded**);
* by attention (``o``/``proj``): permute the value rows of ``v`` -- exact only if ``p`` maps every head's
  ``head_dim`` block onto itself and, with grouped-query attention, identically for the query heads that
  share one kv head (**folded** into ``v`` rows), else a runtime gather;
* by the normalised residual stream (``q,k,v``/``qkv``, ``gate,up``, ``fc1``): folded only if *every*
  residual-reading group has the same permutation (``perm.residual=shared``): the residual stream is then
  stored permuted (embeddings, every norm, every residual writer, ``lm_head`` / head;
  :func:`~permsparse.export.residual.fold_residual_permutation`); otherwise a runtime gather
  (:class:`~permsparse.export.gather.PermutedLinear`).

A group whose permutation is the identity needs neither. Row and column permutations of one weight
compose: e.g. a ViT ``qkv`` stores ``W[rows][:, p_qkv]`` with ``rows`` permuting its v part by ``p_proj``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from permsparse.export.gather import insert_gather
from permsparse.export.residual import fold_residual_permutation, shared_residual_perm
from permsparse.models.binding import (
    BindingGroup,
    BindingSpec,
    OutputRows,
    ResidualStream,
    ValueRows,
    get_spec,
)
from permsparse.permutation.base import is_permutation
from permsparse.permutation.foldable import is_foldable
from permsparse.permutation.heads import as_perm, expand_kv_head_perms, kv_head_perms
from permsparse.sparsity.nm import NMPattern, check_nm

__all__ = [
    "GroupFold",
    "FoldReport",
    "plan_fold",
    "fold_model",
    "check_pruned_nm",
    "check_deployed_nm",
]

IDENTITY, FOLDED, GATHERED = "identity", "folded", "gathered"

RESIDUAL_FOLDED_REASON = (
    "shared residual-stream permutation: folded into the embeddings, every norm, the residual writers' rows "
    "and the head (fold_residual_permutation)"
)
RESIDUAL_STREAM = "<residual stream>"


@dataclass
class GroupFold:
    """What export does with one binding group's permutation.

    Attributes:
        mode: ``"identity"`` (nothing to do), ``"folded"`` (into ``into``'s output rows) or ``"gathered"``
            (a runtime ``index_select`` before every linear of the group).
        reason: one line saying why.
        into: producer modules whose output rows absorb the permutation (``folded`` only).
    """

    name: str
    kind: str
    linears: list[str]
    perm: Tensor
    mode: str
    reason: str
    into: list[str] = field(default_factory=list)

    def to_dict(self, include_perm: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "linears": list(self.linears), "mode": self.mode,
                               "folded": self.mode != GATHERED, "reason": self.reason, "into": list(self.into)}
        if include_perm:
            out["perm"] = [int(i) for i in self.perm.tolist()]
        return out


@dataclass
class FoldReport:
    """Per-group decisions of :func:`fold_model` (in the spec's forward order)."""

    pattern: NMPattern
    groups: list[GroupFold] = field(default_factory=list)

    @property
    def residual_perm(self) -> Tensor | None:
        """The residual-stream permutation folded into the model, if the residual-reading groups were folded."""
        return next((g.perm for g in self.groups if g.mode == FOLDED and RESIDUAL_STREAM in g.into), None)

    def by_mode(self, mode: str) -> list[GroupFold]:
        return [g for g in self.groups if g.mode == mode]

    @property
    def gathers(self) -> dict[str, Tensor]:
        """Gathered linear name -> its input permutation."""
        return {name: g.perm for g in self.by_mode(GATHERED) for name in g.linears}

    def counts(self) -> dict[str, int]:
        """Number of groups and of linears per mode (``{"folded": .., "folded_linears": .., ...}``)."""
        out: dict[str, int] = {}
        for mode in (IDENTITY, FOLDED, GATHERED):
            groups = self.by_mode(mode)
            out[mode] = len(groups)
            out[f"{mode}_linears"] = sum(len(g.linears) for g in groups)
        return out

    def to_dict(self, include_perm: bool = True) -> dict[str, Any]:
        return {"pattern": str(self.pattern), "counts": self.counts(), "residual_stream_folded": self.residual_perm
                is not None, "groups": {g.name: g.to_dict(include_perm) for g in self.groups}}

    def summary(self) -> str:
        """A human-readable table: one line per group."""
        width = max((len(g.name) for g in self.groups), default=4) + 2
        lines = [f"{'group':<{width}}{'mode':<11}reason"]
        lines += [f"{g.name:<{width}}{g.mode:<11}{g.reason}" for g in self.groups]
        c = self.counts()
        lines.append(f"{c[FOLDED]} folded, {c[GATHERED]} gathered, {c[IDENTITY]} identity "
                     f"({c[FOLDED + '_linears']}/{c[GATHERED + '_linears']}/{c[IDENTITY + '_linears']} linears)")
        return "\n".join(lines)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name}: expected an nn.Linear, got {type(module).__name__}")
    return module


def _checked_perms(model: nn.Module, groups: list[BindingGroup], perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    names = {g.name for g in groups}
    unknown = sorted(set(perms) - names)
    if unknown:
        raise ValueError(f"permutations given for unknown binding groups {unknown[:5]}; this model has {len(names)}")
    out = {}
    for group in groups:
        if group.name not in perms:
            raise ValueError(f"no permutation given for binding group {group.name!r}")
        perm = as_perm(perms[group.name])
        d_in = _linear(model, group.linears[0]).in_features
        if not is_permutation(perm, d_in):
            raise ValueError(f"{group.name}: permutation is not a bijection of range({d_in})")
        out[group.name] = perm
    return out


def _residual_foldable(model: nn.Module, spec: BindingSpec) -> str:
    """``""`` if ``spec`` lists ``model``'s residual-stream parameters, else why not (one line)."""
    try:
        spec.residual_params(model)
    except NotImplementedError as e:
        return str(e)
    return ""


def plan_fold(model: nn.Module, perms: Mapping[str, Tensor], spec: BindingSpec | None = None,
              require_foldable: bool = False, fold_residual: bool = True) -> list[GroupFold]:
    """Decide, without touching ``model``, what happens to every group: identity, folded or gathered.

    With ``require_foldable`` a group whose input comes from a producer that *could* absorb it (``o``/``proj``
    via ``v`` rows, ``down``/``fc2`` via rows) but cannot for this permutation is refused with a
    ``ValueError`` naming the group and the reason; residual-stream groups are still gathered. With
    ``fold_residual`` (default) and one permutation shared by every residual-reading group (``perm.residual=
    shared``), those groups are folded into the residual stream (``into == ["<residual stream>"]``).
    """
    spec = spec or get_spec(model)
    groups = spec.groups(model)
    checked = _checked_perms(model, groups, perms)
    shared = shared_residual_perm(groups, checked) if fold_residual else None
    residual_why = _residual_foldable(model, spec) if shared is not None else ""
    plan = []
    for group in groups:
        perm = checked[group.name]
        ok, reason = is_foldable(group, perm)
        producer = group.producer
        into: list[str] = []
        if torch.equal(perm, torch.arange(perm.numel())):
            mode = IDENTITY
        elif isinstance(producer, ResidualStream) and shared is not None:
            if residual_why:
                mode, reason = GATHERED, f"shared residual-stream permutation, but {residual_why}; a runtime gather is inserted"
            else:
                mode, reason, into = FOLDED, RESIDUAL_FOLDED_REASON, [RESIDUAL_STREAM]
        elif ok:
            rows = isinstance(producer, OutputRows)
            into = list(producer.modules) if rows else [producer.module]  # type: ignore[attr-defined]
            chunks = producer.chunks if rows else 1  # type: ignore[attr-defined]
            mismatch = [m for m in into if rows and _linear(model, m).out_features != chunks * perm.numel()]
            if mismatch:
                parts = f"{chunks} x " if chunks > 1 else ""
                ok, reason = False, (f"producer rows of {mismatch} ({_linear(model, mismatch[0]).out_features}) do not "
                                     f"match {parts}the {perm.numel()} input channels (not an elementwise link); "
                                     "a runtime gather is needed")
                into = []
            mode = FOLDED if ok else GATHERED
        else:
            mode = GATHERED
        if mode == GATHERED and require_foldable and not isinstance(producer, ResidualStream):
            raise ValueError(f"{group.name}: permutation of {group.kind!r} is not foldable ({reason}); "
                             "require_foldable=True refuses runtime gathers here. Restrict the permutation to "
                             "within-head blocks identical across the query heads of each kv head "
                             "(permsparse.export.restrict_to_heads) and recompute the masks")
        plan.append(GroupFold(group.name, group.kind, list(group.linears), perm, mode, reason, into))
    return plan


def _row_perms(model: nn.Module, spec: BindingSpec, plan: list[GroupFold]) -> dict[str, Tensor]:
    """Output-row permutation of every producer linear that absorbs a folded group."""
    groups = {g.name: g for g in spec.groups(model)}
    rows: dict[str, Tensor] = {}
    for fold in plan:
        producer = groups[fold.name].producer
        if fold.mode != FOLDED or isinstance(producer, ResidualStream):  # residual: fold_residual_permutation
            continue
        for name in fold.into:
            if name in rows:
                raise ValueError(f"{name} would absorb two permutations (second from {fold.name}); binding spec bug")
            out_features = _linear(model, name).out_features
            if isinstance(producer, OutputRows):  # every chunk of the output rows (a fused gate_up) alike
                d = fold.perm.numel()
                rows[name] = torch.cat([c * d + fold.perm for c in range(producer.chunks)])
            else:  # ValueRows: permute the value rows of every kv head by its local permutation
                assert isinstance(producer, ValueRows)
                head_dim, num_heads, num_kv_heads = producer.head_layout
                local, _ = kv_head_perms(fold.perm, head_dim, num_heads, num_kv_heads)
                assert local is not None  # plan_fold only folds foldable permutations
                start, stop = producer.rows
                if stop - start != num_kv_heads * head_dim:
                    raise ValueError(f"{fold.name}: v rows {start}..{stop} do not hold {num_kv_heads} x {head_dim}")
                full = torch.arange(out_features)
                full[start:stop] = start + expand_kv_head_perms(local, num_kv_heads)
                rows[name] = full
    return rows


def check_pruned_nm(model: nn.Module, perms: Mapping[str, Tensor], pattern: NMPattern | str,
                    spec: BindingSpec | None = None) -> None:
    """Check that an original-order pruned model is N:M once permuted: ``W[:, perm]`` for every bound linear.

    Catches a model/permutation mismatch (perms of another run, an unpruned model) before folding.
    """
    pattern = NMPattern.parse(pattern)
    spec = spec or get_spec(model)
    for group in spec.groups(model):
        perm = as_perm(perms[group.name])
        for name in group.linears:
            weight = _linear(model, name).weight.detach()
            try:
                check_nm(weight[:, perm.to(weight.device)], pattern, name)
            except ValueError as e:
                raise ValueError(f"{e}. The model is not {pattern}-pruned under the permutation of {group.name}: "
                                 "pass the model pruned by prune_model together with its report.perms") from e


def check_deployed_nm(model: nn.Module, pattern: NMPattern | str, names: list[str] | None = None,
                      spec: BindingSpec | None = None) -> None:
    """Check that every bound linear of a deployed model is N:M *as stored* (``check_nm(weight)``)."""
    pattern = NMPattern.parse(pattern)
    if names is None:
        spec = spec or get_spec(model)
        names = [n for g in spec.groups(model) for n in g.linears]
    for name in names:
        check_nm(_linear(model, name).weight.detach(), pattern, name)


@torch.no_grad()
def fold_model(
    model: nn.Module,
    perms: Mapping[str, Tensor],
    pattern: NMPattern | str,
    spec: BindingSpec | None = None,
    require_foldable: bool = False,
    inplace: bool = False,
    fold_residual: bool = True,
) -> tuple[nn.Module, FoldReport]:
    """The deployed model: every bound linear stores ``W[:, perm]`` (N:M in memory) and gets its input permuted.

    ``model`` is pruned in original order by :func:`permsparse.prune.prune_model` and ``perms`` is its
    ``report.perms``. Producer rows absorb the permutations they can (see the module docstring); the rest
    get a :class:`~permsparse.export.gather.PermutedLinear`. The function is unchanged (up to float
    summation order). ``inplace=False`` folds a deep copy and leaves ``model`` as it was. A residual-stream
    permutation shared by all residual-reading groups is folded too (``fold_residual``, default; see
    :func:`plan_fold`): embeddings, norms, writers and head by :func:`fold_residual_permutation`, the readers'
    columns here like every bound linear's.
    """
    pattern = NMPattern.parse(pattern)
    spec = spec or get_spec(model)
    plan = plan_fold(model, perms, spec, require_foldable, fold_residual)
    check_pruned_nm(model, {f.name: f.perm for f in plan}, pattern, spec)
    if not inplace:
        model = copy.deepcopy(model)
    report = FoldReport(pattern, plan)
    if report.residual_perm is not None:
        fold_residual_permutation(model, report.residual_perm, spec, readers=False)
    rows = _row_perms(model, spec, plan)
    cols = {name: f.perm for f in plan for name in f.linears}
    for name in sorted(set(rows) | set(cols)):
        linear = _linear(model, name)
        weight = linear.weight
        row = rows.get(name)
        col = cols.get(name)
        new = weight.detach()
        if row is not None:
            new = new[row.to(weight.device)]
            if linear.bias is not None:
                linear.bias.copy_(linear.bias.detach()[row.to(weight.device)])
        if col is not None:
            new = new[:, col.to(weight.device)]
        weight.copy_(new)  # advanced indexing made ``new`` a copy, so this in-place write is safe
    for fold in plan:
        if fold.mode == GATHERED:
            for name in fold.linears:
                insert_gather(model, name, fold.perm)
    check_deployed_nm(model, pattern, list(cols))
    return model, report
