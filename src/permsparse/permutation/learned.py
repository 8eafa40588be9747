"""The paper's learned permutation, as plain PyTorch: costs, masks and the masked forward of a frozen model.

:class:`LearnedPermutations` attaches one :class:`LearnableCost` to every binding group of a model and a
weight parametrization to every bound linear, so that the model computes with
``W_eff = ((W P) * M(P)) P^T`` (docs/method.md §4.4) where ``P`` is the group's current
(straight-through hard, or soft) permutation and ``M(P)`` the pruner's N:M mask of the permuted
scores. Switching the masks off (:meth:`LearnedPermutations.dense`) gives the dense teacher without a
copy of the model. :class:`LearnedPermutation` holds the method's settings (what ``conf/perm/learned.yaml``
builds); the Lightning callback in :mod:`permsparse.lit` drives it; a notebook can too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from permsparse.errors import ConfigError
from permsparse.models.binding import BindingGroup, BindingSpec, get_spec
from permsparse.permutation.apply import (
    block_permute_scores,
    gradient_workspace,
    hard_permuted_masked_weight,
    native_bf16_matmul,
    permuted_masked_weight,
    soft_mask_gradient,
    soft_top_n_grad_p,
)
from permsparse.permutation.base import (
    PermutationMethod,
    block_to_global,
    find_block_diagonal,
    global_to_block,
    is_permutation,
)
from permsparse.permutation.channel_swap import GreedyChannelSwap
from permsparse.permutation.cost import LearnableCost, solve_costs
from permsparse.permutation.foldable import check_foldable, head_layout, is_foldable, is_head_restricted
from permsparse.permutation.heads import restrict_to_heads
from permsparse.permutation.hungarian import perm_to_matrix
from permsparse.permutation.ria_cp import RIAChannelPermutation
from permsparse.permutation.schedule import SCHEDULES, TemperatureSchedule
from permsparse.sparsity.base import LayerStats, Pruner
from permsparse.sparsity.nm import NMPattern, check_nm_scores, keep_top_n_planes, nm_mask

__all__ = ["LearnedPermutation", "LearnedPermutations", "cost_key", "INITS", "BASES", "MODES"]

INITS = ("identity", "ria", "greedy")
BASES = ("none", "ria", "greedy")
MODES = ("hard", "soft")


def cost_key(group_name: str) -> str:
    """``nn.ModuleDict`` keys may not contain dots."""
    return group_name.replace(".", "__")


def _foldable_init(group: BindingGroup, perm: Tensor) -> Tensor:
    """``perm`` if export can fold it into ``group``'s value rows, else its :func:`restrict_to_heads`."""
    perm = torch.as_tensor(perm).long().cpu()
    return perm if is_foldable(group, perm)[0] else restrict_to_heads(perm, *head_layout(group))


_GRAD_PRECISIONS = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _heuristic(init: str, seed: int) -> PermutationMethod:
    """The heuristic that ``init=ria|greedy`` starts from (with the defaults of ``conf/perm/<init>.yaml``)."""
    return RIAChannelPermutation() if init == "ria" else GreedyChannelSwap(seed=seed)


class _GroupState:
    """Per-group tensors shared by the parametrizations of the group's linears (not a module)."""

    def __init__(self, group: BindingGroup, scores: dict[str, Tensor], dtypes: dict[str, torch.dtype]) -> None:
        self.group = group
        # linear name -> frozen score, transposed to (d_in, d_out): a channel's scores are one contiguous row,
        # so gathering the channels of changed M-blocks copies whole rows (see ``_write_masks``)
        self.scores_t = {name: score.T.contiguous() for name, score in scores.items()}
        self.mean_score = {name: float(score.mean().clamp_min(1e-12)) for name, score in scores.items()}
        # (G, g, g): soft mode, the Sinkhorn matrix the forward uses; hard mode, the carrier of the straight-through
        # gradient (the Sinkhorn matrix while learning, the permutation matrix after ``set_permutations``)
        self.p: Tensor | None = None
        self.masks: dict[str, Tensor] = {}  # linear name -> N:M mask in permuted order (soft mode)
        # hard mode: the mask in original channel order, as 0/1 in the weight's dtype (what the forward multiplies),
        # transposed to (d_in, d_out) like the scores and the weights (see ``LearnedPermutations.attach``)
        self.masks_t: dict[str, Tensor] = {}
        self.dtypes = dtypes  # linear name -> weight dtype
        self.perm: Tensor | None = None  # (d_in,) hard permutation behind ``masks`` (original channel indices)
        self.soft = False  # ``p`` is a soft (Sinkhorn) matrix rather than a permutation in value
        # ``perm.method.base``: the fixed global permutation whose order the blocks are contiguous runs of (None: the
        # original order); ``perm == base[local]``, ``local`` the block-diagonal part the cost learns
        self.base: Tensor | None = None
        self.local: Tensor | None = None

    def frame(self, t: Tensor) -> Tensor:
        """``t`` (``(d_in, ...)``, rows = input channels) with its rows in the frame's order."""
        return t if self.base is None else t.index_select(0, self.base.to(t.device))

    def to(self, device: torch.device) -> None:
        """Move every tensor to ``device`` (dtypes unchanged)."""
        for table in (self.scores_t, self.masks, self.masks_t):
            for name, tensor in table.items():
                table[name] = tensor.to(device)
        self.p = None if self.p is None else self.p.to(device)
        self.perm = None if self.perm is None else self.perm.to(device)
        self.base = None if self.base is None else self.base.to(device)
        self.local = None if self.local is None else self.local.to(device)


class _MaskedWeight(nn.Module):
    """Weight parametrization: ``((W P) * M) P^T`` while masks are on, ``W`` otherwise."""

    def __init__(self, owner: LearnedPermutations, state: _GroupState, name: str) -> None:
        super().__init__()
        # Plain attributes (not submodules) so the owner and state stay out of the model's state dict.
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_state", state)
        self.linear_name = name
        self.workspace: Tensor | None = None  # low-precision P-gradient buffer (``grad_precision``); not state

    def forward(self, weight: Tensor) -> Tensor:
        state: _GroupState = self._state
        if not self._owner.enabled or state.p is None:
            return weight
        p = state.p.to(weight.dtype)
        if state.soft:
            if state.base is None:
                return permuted_masked_weight(weight, p, state.masks[self.linear_name])
            framed = permuted_masked_weight(weight.index_select(1, state.base), p, state.masks[self.linear_name])
            return framed.index_select(1, torch.argsort(state.base))  # back to the original channel order
        out = hard_permuted_masked_weight(weight, p, state.local, mask_original=state.masks_t[self.linear_name].T,
                                          workspace=self.workspace, base=state.base)
        method = self._owner.method
        if method.mask_grad and torch.is_grad_enabled():
            score_t = state.scores_t[self.linear_name]
            pattern = self._owner.pattern
            out = soft_mask_gradient(out, p, weight, score_t.T, state.perm, pattern.n, pattern.m,
                                     method.mask_tau * state.mean_score[self.linear_name], base=state.base)
        return out


@dataclass
class LearnedPermutation:
    """The learned method's settings (``conf/perm/learned.yaml``, key ``perm.method``): the one place of its defaults.

    Built by Hydra from its config group like every other permutation method; the data it needs (model,
    pruner, calibration statistics) arrive later, in :meth:`build`. Invalid values raise
    :class:`~permsparse.errors.ConfigError` naming the key. Adding a knob is adding a field here (used in
    :meth:`build`, :meth:`refresh` or :class:`LearnedPermutations`) and the same key, with the same default,
    in the yaml (a test checks that the two agree).

    Attributes:
        groups: channel groups G per layer: each layer's permutation is block-diagonal with G blocks.
        block_size: instead of a fixed count, blocks of this many channels (PermLLM's convention; ``None``: use
            ``groups``). A layer of ``d_in`` channels then has ``d_in / block_size`` blocks.
        init: ``"identity"`` (cost ``-I`` plus noise: the first hard permutation is the identity, so step 0 is
            the pruner without a permutation), ``"ria"`` / ``"greedy"`` (RIA channel permutation / greedy channel
            swap run inside each block: learning starts where the heuristic ends) or, in Python, a mapping
            ``group name -> (d_in,) permutation``. Under a ``base`` the start is taken in the base's frame:
            ``identity`` then starts exactly at the base heuristic's permutation.
        base: ``"none"`` (blocks are contiguous runs of the original channel order) or ``"ria"`` / ``"greedy"``:
            the heuristic's permutation of the whole layer (what ``perm=ria|greedy`` finds) fixes the frame, the
            blocks are contiguous runs of its order, and the learned block-diagonal permutation is applied on top
            of it (the layer's permutation is ``base[local]``). With ``init=identity`` learning begins exactly where
            the global heuristic ends, rather than at the heuristic run inside each block. With a mapping ``init``
            the given permutation of each group is its frame instead of the heuristic's (learning begins exactly
            at it, in blocks that are runs of its order; block-local learning's permutations start the
            end-to-end pass this way). With ``foldable``, the groups restricted to heads (their blocks are the
            heads) keep the original order and, with ``init=identity``, start at the base heuristic run inside
            their blocks (as ``init=ria|greedy`` would); the base applies to every other group.
        init_scale: size of the ``-I`` (or ``-P_init``) initial cost before normalisation.
        noise: std of the initial Gaussian noise, relative to ``init_scale`` (breaks ties).
        normalize: standardise each ``g x g`` cost block before Sinkhorn.
        mode: ``"hard"`` (Hungarian + straight-through) or ``"soft"`` (the Sinkhorn matrix itself).
        sinkhorn_iters: Sinkhorn iterations from scratch (the first step; every step when ``warm_iters`` is None).
        warm_iters: iterations warm-started from the previous step's dual potentials (None: always from scratch).
        gumbel_scale: scale of Gumbel noise on the cost while training (0: none).
        grad_precision: matmuls of the hard mode's permutation gradient: ``"float32"``, ``"bfloat16"`` or ``"auto"``
            (bfloat16 where the device has native bf16 dot products, float32 elsewhere).
        tau_start, tau_end, tau_schedule: the Sinkhorn temperature, annealed over all training steps
            (:class:`~permsparse.permutation.schedule.TemperatureSchedule`).
        foldable: ``perm.foldable``: attention-output groups learn within-head permutations tied per kv head.
        seed: seed of the cost initialisation and of the Gumbel noise.
        mask_grad: a gradient through the mask selection too (hard mode): the forward pass keeps the hard N:M
            mask, the backward pass adds the gradient of a straight-through soft top-N over each M-group of the
            permuted scores (``N * softmax(S P / t)``; PermLLM's idea), which the paper's constant mask lacks.
        mask_tau: the soft top-N's temperature ``t``, in units of each layer's mean score.
        kept_weight: weight of the kept-score term :meth:`LearnedPermutations.regularizer` adds to the loss:
            ``kept_weight * (1 - mean over groups of kept(P) / kept(start))``, with ``kept(P)`` the pruner's score
            that the current masks keep, differentiable through ``P`` (with ``mask_grad``, also through the soft
            top-N of the mask selection; :meth:`LearnedPermutations._kept`). It pulls the permutation towards
            keeping the saliency a heuristic keeps. 0 (default): no term.
    """

    groups: int = 4
    block_size: int | None = None
    init: str | Mapping[str, Tensor] = "identity"
    base: str = "ria"
    init_scale: float = 0.25
    noise: float = 0.01
    normalize: bool = True
    mode: str = "hard"
    sinkhorn_iters: int = 20
    warm_iters: int | None = 5
    gumbel_scale: float = 0.0
    grad_precision: str = "auto"
    tau_start: float = 1.0
    tau_end: float = 0.05
    tau_schedule: str = "exponential"
    foldable: bool = False
    seed: int = 0
    mask_grad: bool = True
    mask_tau: float = 1.0
    kept_weight: float = 0.0

    KEY: ClassVar[str] = "perm.method"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{self.KEY}.{name}={getattr(self, name)!r} is invalid: {why}")

        optional = tuple(n for n in ("warm_iters", "block_size") if getattr(self, n) is not None)
        for name in ("groups", "sinkhorn_iters", "seed") + optional:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise bad(name, f"it must be an integer >= {0 if name == 'seed' else 1}"
                          + ("; null runs every step from scratch" if name == "warm_iters" else "")
                          + ("; null uses groups" if name == "block_size" else ""))
        for name, choices in (("mode", MODES), ("grad_precision", tuple(_GRAD_PRECISIONS)), ("base", BASES),
                              ("tau_schedule", SCHEDULES)) + ((("init", INITS),) if isinstance(self.init, str) else ()):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{self.KEY}.{name}={getattr(self, name)!r} is invalid; choose "
                                  f"{', '.join(choices[:-1])} or {choices[-1]}")
        for name in ("tau_start", "tau_end"):
            if not float(getattr(self, name)) > 0:
                raise bad(name, "temperatures must be > 0")
        if not float(self.init_scale) > 0:
            raise bad("init_scale", "it must be > 0")
        for name in ("noise", "gumbel_scale", "kept_weight"):
            if not float(getattr(self, name)) >= 0:
                raise bad(name, "it must be >= 0")
        if not float(self.mask_tau) > 0:
            raise bad("mask_tau", "it must be > 0")
        if self.mask_grad is True and self.mode != "hard":
            raise ConfigError(f"{self.KEY}.mask_grad=true needs {self.KEY}.mode=hard (the soft mode's mask is "
                              "recomputed from the Sinkhorn matrix and has no straight-through estimate here); "
                              f"with {self.KEY}.mode=soft set {self.KEY}.mask_grad=false")
        for name in ("normalize", "foldable", "mask_grad"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "it must be true or false")

    def by_heads(self, group: BindingGroup) -> bool:
        """Whether ``group``'s blocks are its heads (``foldable`` and an attention-output group)."""
        return self.foldable and is_head_restricted(group)

    def framed(self, group: BindingGroup) -> bool:
        """Whether ``group``'s channels live in a ``base`` frame (a base is set and the group is not head-restricted)."""
        return self.base != "none" and not self.by_heads(group)

    def blocks_for(self, d_in: int, m: int, name: str = "layer") -> int:
        """The number of blocks of a layer of ``d_in`` input channels under N:M with this ``m``; a
        :class:`~permsparse.errors.ConfigError` naming the key if they do not divide it into whole M-groups."""
        if self.block_size is not None:
            if d_in % self.block_size or self.block_size % m:
                raise ConfigError(f"{name}: d_in={d_in} is not a multiple of {self.KEY}.block_size={self.block_size}, "
                                  f"or the block size is not a multiple of M={m}; choose a block size dividing {d_in} "
                                  f"that M divides, or {self.KEY}.block_size=null")
            return d_in // self.block_size
        if d_in % (self.groups * m):
            raise ConfigError(f"{name}: d_in={d_in} is not divisible by groups x M = {self.groups} x {m}; "
                              f"choose {self.KEY}.groups dividing {d_in // m}")
        return self.groups

    def schedule(self, total_steps: int = 1) -> TemperatureSchedule:
        """The temperature schedule over ``total_steps`` optimiser steps."""
        return TemperatureSchedule(self.tau_start, self.tau_end, total_steps, self.tau_schedule)

    def build(self, model: nn.Module, pruner: Pruner, pattern: NMPattern | str,
              stats: Mapping[str, LayerStats] | None = None, spec: BindingSpec | None = None,
              block: int | None = None) -> LearnedPermutations:
        """The learnable costs and masks of every binding group of ``model`` (of block ``block`` only, if given),
        not yet attached."""
        return LearnedPermutations(model, pruner, pattern, stats, self, spec, block)

    def refresh(self, learned: LearnedPermutations, tau: float, generator: torch.Generator | None = None) -> float:
        """One step's permutations and masks at temperature ``tau``; returns the Sinkhorn residual."""
        return learned.refresh(tau, hard=self.mode == "hard", n_iters=self.sinkhorn_iters,
                               gumbel_scale=self.gumbel_scale, generator=generator, warm_iters=self.warm_iters)


class LearnedPermutations(nn.Module):
    """Learnable block-diagonal permutations for every binding group of a frozen model.

    Args:
        model: the model (its weights are frozen by :meth:`attach`).
        pruner: mask generator whose ``score`` ranks weights (Wanda, RIA, magnitude, SparseGPT saliency).
        pattern: the N:M pattern.
        stats: calibration statistics per linear name (if the pruner needs them).
        method: the settings (:class:`LearnedPermutation`; its defaults when omitted). Of them, this module uses
            ``groups`` / ``block_size``, ``init`` / ``init_scale`` / ``noise`` / ``normalize`` / ``seed`` (passed to
            :class:`LearnableCost`, group ``i`` seeded ``seed + i``), ``mask_grad`` / ``mask_tau`` (in the masked
            forward), ``kept_weight`` (:meth:`regularizer`), ``foldable`` and ``grad_precision``:

            * ``foldable`` restricts the attention-output groups (``o_proj`` / ``attn.proj``, producer
              :class:`~permsparse.models.binding.ValueRows`) to permutations export can fold: their blocks are the
              heads (``num_heads`` groups of ``head_dim``, ignoring ``groups``) and the query heads sharing a kv
              head share one cost (:class:`LearnableCost` with ``tie``). An ``init`` permutation of such a group
              that is not foldable is replaced by :func:`~permsparse.permutation.heads.restrict_to_heads` of it.
            * ``grad_precision``: ``"bfloat16"`` computes the hard mode's ``P``-gradient as one bf16 matmul with
              fp32 accumulation (result rounded to bf16) via a :func:`~permsparse.permutation.apply.gradient_workspace`
              per linear (4 bytes per weight); ``"auto"`` picks it where it runs natively
              (:func:`~permsparse.permutation.apply.native_bf16_matmul`), float32 elsewhere. Resolved at
              :meth:`attach`, on the model's device; :attr:`grad_dtype` tells which.
        spec: binding spec (found from the model class if omitted).
        block: only the groups of this block (block-local learning, :mod:`permsparse.block_local`); ``None``: all.
            A group's cost is initialised (and seeded) as in the whole-model case.
    """

    def __init__(
        self,
        model: nn.Module,
        pruner: Pruner,
        pattern: NMPattern | str,
        stats: Mapping[str, LayerStats] | None = None,
        method: LearnedPermutation | None = None,
        spec: BindingSpec | None = None,
        block: int | None = None,
    ) -> None:
        super().__init__()
        method = LearnedPermutation() if method is None else method
        self.method = method
        init, foldable = method.init, method.foldable
        self.grad_precision = method.grad_precision
        self.grad_dtype: torch.dtype | None = None  # resolved by attach
        self.pattern = NMPattern.parse(pattern)
        self.spec = spec or get_spec(model)
        all_groups = self.spec.groups(model)
        self.binding = [g for g in all_groups if block is None or g.block == block]
        self.block = block  # the one block learned here (block-local), or None: every block
        if not self.binding:
            raise ValueError(f"{type(model).__name__} has no binding group in block {block}")
        self.foldable = foldable
        if foldable:
            check_foldable(self.binding, self.pattern)
        self.enabled = True
        self.costs = nn.ModuleDict()
        self._states: dict[str, _GroupState] = {}
        object.__setattr__(self, "_model", model)  # not a submodule: only the costs are parameters here
        for index, group in enumerate(all_groups):  # the group's index in the model seeds its cost
            if block is not None and group.block != block:
                continue
            scores, dtypes = {}, {}
            for name in group.linears:
                weight = model.get_submodule(name).weight.detach()
                scores[name] = pruner.score(weight.float(), None if stats is None else stats.get(name)).float()
                check_nm_scores(scores[name], self.pattern, name)  # once: the mask updates skip nm_mask's check
                dtypes[name] = weight.dtype
            d_in = next(iter(scores.values())).shape[1]
            by_heads = method.by_heads(group)
            groups = method.groups if by_heads else method.blocks_for(d_in, self.pattern.m, group.name)
            stacked = torch.cat(list(scores.values()))
            base = None
            if method.framed(group):  # the global heuristic fixes the frame the blocks live in
                if isinstance(init, str):
                    base = _heuristic(method.base, method.seed).find(stacked, self.pattern, group.name).long()
                else:  # a given start is the frame itself: learning begins exactly at it
                    base = torch.as_tensor(init[group.name]).long().cpu()
                    if not is_permutation(base, d_in):
                        raise ValueError(f"{group.name}: the init is not a permutation of its {d_in} input channels")
                stacked = stacked[:, base]
            start = init
            if by_heads and method.base != "none" and init == "identity":
                start = method.base  # no global frame for a head-restricted group: the base heuristic inside its blocks
            if start in ("ria", "greedy"):  # the heuristic inside each of the blocks, so the start is block-diagonal
                heuristic = _heuristic(start, method.seed)
                group_init: str | Tensor = find_block_diagonal(heuristic, stacked, self.pattern, groups, group.name)
            elif isinstance(init, str):
                group_init = init
            else:  # a given permutation: the start itself, or (under a base) the frame, which it then starts at
                group_init = "identity" if base is not None else init[group.name]
            n_groups, tie = groups, 1
            if by_heads:
                head_dim, num_heads, num_kv_heads = head_layout(group)
                n_groups, tie = num_heads, num_heads // num_kv_heads
                if not isinstance(group_init, str):
                    group_init = _foldable_init(group, group_init)
            self.costs[cost_key(group.name)] = LearnableCost(
                d_in, n_groups, group_init, method.init_scale, method.noise, method.normalize, seed=method.seed + index,
                tie=tie,
            )
            self._states[group.name] = _GroupState(group, scores, dtypes)
            self._states[group.name].base = base
        self._attached = False
        self._masked: list[tuple[_MaskedWeight, nn.Module, int]] = []  # (parametrization, linear, groups)
        self._kept_start: dict[str, Tensor] = {}  # the start's kept score per group (kept-score term only)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``.to(device)`` / ``.cuda()`` move the per-group scores and masks too (they are not buffers: the checkpoint
        keeps only the costs), and the gradient workspaces follow, re-chosen for the new device under
        ``grad_precision="auto"``. Lightning builds this module on the CPU in the callback's ``setup`` and moves
        it with the LightningModule to the accelerator afterwards."""
        super()._apply(fn, recurse)
        if self.costs:
            device = next(iter(self.costs.values())).raw.device
            for state in self._states.values():
                state.to(device)
            if self._attached:
                self._place_workspaces(device)
        return self

    # -- wiring ---------------------------------------------------------------------------------
    def attach(self) -> LearnedPermutations:
        """Freeze the model and parametrize every bound linear's weight with its group's mask.

        The bound weights are re-laid out in place as transposed storage (same shape and values, ``W.T``
        contiguous; the copy is made one layer at a time), so that a group's input channels are contiguous rows
        for the masked product and its gradient (:func:`hard_permuted_masked_weight`). :meth:`detach_model`
        restores the ordinary layout.
        """
        model = self._model
        for param in model.parameters():
            param.requires_grad_(False)
        self._masked = []
        for group_name, state in self._states.items():
            for name in state.group.linears:
                module = model.get_submodule(name)
                masked = _MaskedWeight(self, state, name)
                parametrize.register_parametrization(module, "weight", masked, unsafe=True)
                original = module.parametrizations.weight.original
                original.data = original.data.T.contiguous().T
                self._masked.append((masked, module, self.costs[cost_key(group_name)].groups))
        self._place_workspaces(next(iter(self.costs.values())).raw.device)
        self._attached = True
        self.refresh(tau=1.0, hard=True)
        if self.method.kept_weight > 0:
            with torch.no_grad():  # the start's kept score per group: the reference of the kept-score term
                self._kept_start = {name: self._kept(state, exact=True) for name, state in self._states.items()}
        return self

    def _kept(self, state: _GroupState, exact: bool = False) -> Tensor:
        """Score kept by ``state``'s current masks: ``sum <S P, M>`` over the group's linears (``M`` in permuted
        order), differentiable through ``P``; ``exact`` uses the hard permutation instead of ``P``.

        With the constant mask, ``M`` is a constant and the gradient to ``P`` is ``S^T M`` per block. That
        gradient favours the arrangement the mask already has, so the term pins the permutation rather than
        raising the kept score. With ``mask_grad`` the mask is the straight-through soft top-N of the forward
        pass (:func:`~permsparse.permutation.apply.soft_mask_gradient`), and the gradient gains the mask's own
        path, ``S^T dK/d(S P)`` through the soft top-N with ``dK/dM = S P``: how re-selecting the kept entries
        would change the kept score. The value stays the hard kept score."""
        total = torch.zeros((), device=state.p.device)
        pattern, through_mask = self.pattern, self.method.mask_grad and not state.soft
        for name, score_t in state.scores_t.items():
            if state.soft:
                mask_perm_t = state.masks[name].T.to(score_t.dtype)  # (d_in, d_out), permuted order
            else:
                mask_perm_t = state.masks_t[name].index_select(0, state.perm.to(score_t.device)).to(score_t.dtype)
            if exact:
                total = total + (score_t.index_select(0, state.perm.to(score_t.device)) * mask_perm_t).sum()
                continue
            blocks, g = state.p.shape[0], state.p.shape[1]
            s_b = state.frame(score_t).reshape(blocks, g, -1)
            m_b = mask_perm_t.reshape(blocks, g, -1)
            with torch.no_grad():  # C[b, i, j] = sum_r S[r, b g + i] M[r, b g + j]: the gradient of <S P, M> to P
                c = torch.bmm(s_b, m_b.transpose(1, 2))
            p = state.p.to(c.dtype)
            total = total + (p * c).sum()
            if through_mask:  # dK/dM = S P: the upstream of the soft top-N is the permuted scores themselves
                sp = score_t.index_select(0, state.perm.to(score_t.device))
                c_mask = soft_top_n_grad_p(state.frame(score_t), sp, sp, pattern.n, pattern.m,
                                           self.method.mask_tau * state.mean_score[name], blocks).to(c.dtype)
                extra = (p * c_mask).sum()
                total = total + extra - extra.detach()  # the gradient only: the value is the hard kept score
        return total

    def regularizer(self) -> Tensor | None:
        """The kept-score term of the loss (``method.kept_weight``; see :class:`LearnedPermutation`), or ``None``
        when its weight is 0. Call after :meth:`refresh`."""
        weight = self.method.kept_weight
        if weight == 0 or not self._attached:
            return None
        ratios = [self._kept(state) / self._kept_start[name].clamp_min(1e-12) for name, state in self._states.items()]
        return weight * (1 - torch.stack(ratios).mean())

    def _place_workspaces(self, device: torch.device) -> None:
        """Resolve ``grad_precision`` for ``device`` and give every bound linear a workspace there (or none)."""
        if self.grad_precision == "auto":
            self.grad_dtype = torch.bfloat16 if native_bf16_matmul(device) else torch.float32
        else:
            self.grad_dtype = _GRAD_PRECISIONS[self.grad_precision]
        for masked, module, groups in self._masked:
            workspace = masked.workspace
            if self.grad_dtype == torch.float32:
                masked.workspace = None
            elif workspace is None or workspace.device != device or workspace.dtype != self.grad_dtype:
                original = module.parametrizations.weight.original
                masked.workspace = gradient_workspace(original.to(device), groups, self.grad_dtype,
                                                      base=masked._state.base)

    def detach_model(self) -> None:
        """Remove the parametrizations, leaving the original dense weights in place."""
        if not self._attached:
            return
        for state in self._states.values():
            for name in state.group.linears:
                module = self._model.get_submodule(name)
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                module.weight.data = module.weight.data.contiguous()  # undo attach's transposed layout
        self._masked = []
        self._attached = False

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        """Masks off: the model computes with its dense weights (the distillation teacher)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # -- per step -------------------------------------------------------------------------------
    def refresh(self, tau: float, hard: bool = True, n_iters: int = 20, gumbel_scale: float = 0.0,
                generator: torch.Generator | None = None, warm_iters: int | None = None) -> float:
        """Recompute every group's ``P`` (with gradient to the costs) and its N:M masks (constants).

        Returns the largest doubly-stochastic residual of the Sinkhorn matrices (a convergence check).
        """
        costs = [self.costs[cost_key(name)] for name in self._states]
        # hard: the masked weight takes the permutation from ``perm`` and P only as the carrier of the
        # straight-through gradient, so the Sinkhorn matrix itself is passed (same gradient, no hard matrix built)
        solved = solve_costs(costs, tau, n_iters, hard, gumbel_scale, generator, warm_iters, hard_value=False)
        for state, (p, local) in zip(self._states.values(), solved, strict=True):
            self._set(state, p, block_to_global(local), soft=not hard)  # local: in the base's frame
        return max(cost.last_residual for cost in costs)

    @torch.no_grad()
    def set_permutations(self, perms: Mapping[str, Tensor]) -> None:
        """Use fixed hard permutations (no gradient), e.g. for validation or the final evaluation. Permutations are
        in original channel indices (as :meth:`hard_permutations` gives them); under a base they must be
        ``base[local]`` with ``local`` block-diagonal."""
        for group_name, state in self._states.items():
            cost = self.costs[cost_key(group_name)]
            perm = perms[group_name].to(cost.raw.device).long()
            if state.base is not None:
                perm = torch.argsort(state.base.to(perm.device))[perm]  # into the frame
            self._set(state, perm_to_matrix(global_to_block(perm, cost.groups), cost.raw.dtype), perm)

    def _set(self, state: _GroupState, p: Tensor, local: Tensor, soft: bool = False) -> None:
        # ``local``: the permutation in the base's frame (the original order without a base)
        state.local = local
        perm = local if state.base is None else state.base.to(local.device)[local]
        # Hard: the mask depends on the permutation only, so it is recomputed only when that changes.
        # Soft: the mask is the N:M mask of the softly permuted scores S P, new every step.
        if soft:
            state.masks_t.clear()
            for name, score_t in state.scores_t.items():
                framed = state.frame(score_t).T
                state.masks[name] = nm_mask(block_permute_scores(framed, p.to(score_t.device)), self.pattern, name)
        elif state.soft or state.perm is None or not state.masks_t:
            state.masks.clear()
            state.masks_t = {name: torch.empty(score_t.shape, dtype=state.dtypes[name], device=score_t.device)
                             for name, score_t in state.scores_t.items()}
            self._write_masks(state, perm, torch.arange(perm.numel()))
        elif not torch.equal(state.perm, perm):
            # Only the M-column blocks whose channels changed get a new mask (masks are per block).
            m = self.pattern.m
            blocks = (perm != state.perm).reshape(-1, m).any(-1).nonzero().squeeze(1)
            self._write_masks(state, perm, (blocks.unsqueeze(1) * m + torch.arange(m, device=blocks.device)).reshape(-1))
        state.perm = perm
        state.p = p
        state.soft = soft

    def _write_masks(self, state: _GroupState, perm: Tensor, cols: Tensor) -> None:
        """N:M masks of the permuted positions ``cols`` (whole M-blocks), written in original order: the
        channels now at those positions, ``perm[cols]``, are exactly the ones whose original-order mask changes: whole
        rows of the transposed masks."""
        m, n = self.pattern.m, self.pattern.n
        # plane j holds the channels at offset j of every changed block: rows of the transposed scores
        order = perm[cols.to(perm.device)].reshape(-1, m).T.reshape(-1)
        for name, score_t in state.scores_t.items():
            rows = order.to(score_t.device)
            keep = keep_top_n_planes(score_t.index_select(0, rows).view(m, -1, score_t.shape[1]), n)
            mask_t = state.masks_t[name]
            mask_t.index_copy_(0, rows, keep.view(-1, score_t.shape[1]).to(mask_t.dtype))

    @torch.no_grad()
    def hard_permutations(self) -> dict[str, Tensor]:
        """The zero-temperature permutation of every group (Hungarian on the cost), ``(d_in,)`` each."""
        perms = {name: self.costs[cost_key(name)].harden().cpu() for name in self._states}
        return {name: perm if (base := self._states[name].base) is None else base.cpu()[perm]
                for name, perm in perms.items()}

    def current_permutations(self) -> dict[str, Tensor]:
        """The hard permutations used in the last forward pass."""
        return {name: state.perm.detach().cpu() for name, state in self._states.items() if state.perm is not None}

    @property
    def group_names(self) -> list[str]:
        return list(self._states)
