"""Block-local learning (``learning.mode=block``): the permutations of one Transformer block at a time.

Blocks are learned in forward order. Block ``k``'s costs are trained to make its sparse output match its dense
output on the same inputs (the paper's per-block SmoothL1 term, alone), and its inputs are the outputs of blocks
``0 .. k-1`` after those were pruned with their learned permutations: the sequential convention of Wanda and
SparseGPT, walked with the same helpers as sequential calibration (:func:`capture_block_inputs`,
:func:`advance_block_inputs`). Only the current block's costs, optimiser state, scores and masks exist, on
``device``; the block itself is moved there while it learns, and its finished permutations are fixed (the best
hardened ones by validation loss, as end to end). The model is dense again when :func:`learn_block_local` returns,
so the run flow prunes, evaluates and exports it exactly as after end-to-end learning (docs/method.md §4.8).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from permsparse.models.binding import BindingGroup, BindingSpec, get_spec
from permsparse.permutation.learned import LearnedPermutation, LearnedPermutations
from permsparse.prune import GroupReport, prune_group
from permsparse.sparsity.base import LayerStats, Pruner
from permsparse.sparsity.calibration import (
    BlockInputs,
    _model_device,
    _to_device,
    advance_block_inputs,
    block_hidden_state,
    capture_block_inputs,
    move_stats,
    run_block,
)
from permsparse.sparsity.nm import NMPattern

__all__ = ["BlockSettings", "learn_block_local"]

#: non-finite losses in a row that stop a block's training (as end to end)
MAX_NONFINITE = 5


@dataclass
class BlockSettings:
    """How each block learns (from ``learning`` / ``perm`` / ``trainer`` in :func:`permsparse.run.train`).

    Attributes:
        steps: optimiser steps per block (``learning.block_steps``).
        optimizer: partial optimiser factory called with ``params=`` (``perm.optimizer``).
        scheduler: partial LR-scheduler factory called with ``optimizer=`` and ``T_max=steps``, or ``None``.
        val_every: validate the hardened permutations every this many steps (``None``: at the start and the end only).
        device: where the current block, its inputs' batch and its trainable state live.
        bf16: run the block under bfloat16 autocast (``trainer.precision=bf16-mixed``).
        seed: seeds the order of the cached training batches (per block: ``seed + block``).
        progress: a progress bar per block.
    """

    steps: int
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any] | None = None
    val_every: int | None = None
    device: torch.device | str = "cpu"
    bf16: bool = False
    seed: int = 0
    progress: bool = True

    def autocast(self) -> contextlib.AbstractContextManager:
        device = torch.device(self.device)
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


def _distill_loss(block: nn.Module, inputs: tuple[tuple, dict], target: Tensor, settings: BlockSettings) -> Tensor:
    """SmoothL1 (mean, beta 1, float32) between the block's output on ``inputs`` and the dense ``target``."""
    args, kwargs = _to_device(inputs, torch.device(settings.device))
    with settings.autocast():
        out = block_hidden_state(block(*args, **kwargs))
    return F.smooth_l1_loss(out.float(), target.to(out.device).float())


@torch.no_grad()
def _validate(learned: LearnedPermutations, block: nn.Module, inputs: BlockInputs, targets: list[Tensor],
              settings: BlockSettings) -> tuple[float, dict[str, Tensor]]:
    """The distillation loss (token-weighted mean over the validation windows) of the zero-temperature
    permutations, and those permutations."""
    perms = learned.hard_permutations()
    learned.set_permutations(perms)
    total = count = 0.0
    for x, t in zip(inputs, targets, strict=True):
        total += float(_distill_loss(block, x, t, settings)) * t.numel()
        count += t.numel()
    return total / count, perms


def _dense_targets(block: nn.Module, inputs: BlockInputs, settings: BlockSettings) -> list[Tensor]:
    with settings.autocast():
        return [run_block(block, x) for x in inputs]


def _learn_block(model: nn.Module, index: int, n_blocks: int, method: LearnedPermutation, pruner: Pruner,
                 pattern: NMPattern, stats: Mapping[str, LayerStats] | None, spec: BindingSpec,
                 train_in: BlockInputs, val_in: BlockInputs, settings: BlockSettings) -> tuple[dict[str, Tensor], dict]:
    """Train block ``index``'s costs (the block is on ``settings.device``); return its best hardened permutations
    and its summary. Its weights are dense again on return."""
    start = time.perf_counter()
    block = spec.blocks(model)[index]
    train_t = _dense_targets(block, train_in, settings)  # the dense block on the same inputs: the targets
    val_t = _dense_targets(block, val_in, settings)
    learned = method.build(model, pruner, pattern, stats, spec=spec, block=index).to(settings.device)
    learned.attach()
    try:
        optimizer = settings.optimizer(params=list(learned.parameters()))
        scheduler = settings.scheduler(optimizer=optimizer, T_max=settings.steps) if settings.scheduler else None
        schedule = method.schedule(settings.steps)
        gumbel = torch.Generator().manual_seed(method.seed + index)
        order_gen = torch.Generator().manual_seed(settings.seed + index)
        best_loss, best_perms = _validate(learned, block, val_in, val_t, settings)  # the start is a candidate
        history = [{"step": 0, "val_loss": best_loss}]
        losses: list[float] = []
        order: list[int] = []
        nonfinite = 0
        bar = tqdm(range(settings.steps), desc=f"block {index + 1}/{n_blocks}", disable=not settings.progress)
        for step in bar:
            if not order:  # a new pass over the cached training batches, in a seeded order
                order = torch.randperm(len(train_in), generator=order_gen).tolist()
            b = order.pop(0)
            method.refresh(learned, schedule(step), gumbel)
            loss = _distill_loss(block, train_in[b], train_t[b], settings)
            extra = learned.regularizer()
            if extra is not None:
                loss = loss + extra
            if not torch.isfinite(loss):
                nonfinite += 1
                if nonfinite >= MAX_NONFINITE:
                    raise FloatingPointError(f"block {index}: {nonfinite} non-finite losses in a row; lower the "
                                             "learning rate or raise perm.method.tau_end")
                continue
            nonfinite = 0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if (settings.val_every and (step + 1) % settings.val_every == 0) or step + 1 == settings.steps:
                val_loss, perms = _validate(learned, block, val_in, val_t, settings)
                history.append({"step": step + 1, "val_loss": val_loss})
                if math.isfinite(val_loss) and val_loss < best_loss:
                    best_loss, best_perms = val_loss, perms
        grad_dtype = str(learned.grad_dtype).removeprefix("torch.")
    finally:
        learned.detach_model()  # dense weights back in place; the costs, optimiser and masks go with ``learned``
    summary = {"block": index, "groups": list(best_perms), "steps": len(losses), "seconds": time.perf_counter() - start,
               "first_loss": losses[0] if losses else math.nan, "final_loss": losses[-1] if losses else math.nan,
               "best_val_loss": best_loss, "train_losses": losses, "history": history, "grad_dtype": grad_dtype}
    return best_perms, summary


@torch.no_grad()
def _restore(model: nn.Module, dense: dict[str, Tensor]) -> None:
    for name, weight in dense.items():
        model.get_submodule(name).weight.copy_(weight)
    dense.clear()


def _dense_copy(model: nn.Module, groups: Iterable[BindingGroup]) -> dict[str, Tensor]:
    """A host copy of the weights of ``groups``' linears, for :func:`_restore` once the block is pruned."""
    return {name: model.get_submodule(name).weight.detach().to("cpu", copy=True) for g in groups for name in g.linears}


def _by_block(spec: BindingSpec, model: nn.Module) -> dict[int, list[BindingGroup]]:
    by_block: dict[int, list[BindingGroup]] = {}
    for group in spec.groups(model):
        by_block.setdefault(group.block, []).append(group)
    return by_block


def _fix_block(model: nn.Module, index: int, n_blocks: int, groups: list[BindingGroup], method: LearnedPermutation,
               pruner: Pruner, pattern: NMPattern, stats: Mapping[str, LayerStats] | None, spec: BindingSpec,
               train_in: BlockInputs, val_in: BlockInputs, settings: BlockSettings,
               done: Mapping[int, tuple[dict[str, Tensor], dict]]) -> tuple[dict[str, Tensor], dict, list[GroupReport]]:
    """Block ``index``'s permutations (learned by :func:`_learn_block`, or taken from ``done``), then its ``groups``
    pruned in place with them and ``stats``, exactly as the final pruning prunes them: the next blocks learn on this
    block's pruned output. Returns the permutations, the block's summary and one report per group."""
    if index in done:
        block_perms, summary = done[index]
    else:
        block_perms, summary = _learn_block(model, index, n_blocks, method, pruner, pattern, stats, spec, train_in,
                                            val_in, settings)
    reports = [prune_group(model, group, pruner, pattern, block_perms[group.name], stats) for group in groups]
    return block_perms, summary, reports


def learn_block_local(model: nn.Module, method: LearnedPermutation, pruner: Pruner, pattern: NMPattern | str,
                      stats: Mapping[str, LayerStats] | None, train_batches: Iterable[Any], val_batches: Iterable[Any],
                      settings: BlockSettings, forward: Callable | None = None, spec: BindingSpec | None = None,
                      done: Mapping[int, tuple[dict[str, Tensor], dict]] | None = None,
                      on_block_end: Callable[[dict[str, Tensor], list[dict]], None] | None = None,
                      ) -> tuple[dict[str, Tensor], list[dict]]:
    """Learn every block's permutations one block after another; return ``(group name -> (d_in,) permutation,
    one summary per block)``, the permutations of the same kind as end-to-end learning's.

    ``train_batches`` / ``val_batches``: the learning windows (``forward(model, batch)`` runs one; the inputs of the
    first block are captured from it). ``done``: blocks already learned (``block -> (its permutations, its
    summary)``, from a checkpoint): they are pruned with those permutations and not trained again.
    ``on_block_end(perms so far, summaries so far)`` runs after each block (the run flow writes its checkpoint).
    Each block is pruned in place while its output for the next block is computed, then its dense weights are
    restored (one block's dense copy on the host at a time): the model is dense again on return, also on error.
    """
    pattern = NMPattern.parse(pattern)
    spec = spec or get_spec(model)
    blocks = spec.blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: its binding spec lists no blocks; learning.mode=block needs them")
    by_block = _by_block(spec, model)
    done = dict(done or {})
    device, host = torch.device(settings.device), _model_device(model)
    train_in = capture_block_inputs(model, blocks[0], train_batches, forward, settings.progress)
    val_in = capture_block_inputs(model, blocks[0], val_batches, forward, settings.progress)
    dense: dict[str, Tensor] = {}  # the current block's dense weights, restored once its pruned output is cached
    perms: dict[str, Tensor] = {}
    summaries: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        for index, block in enumerate(blocks):
            block.to(device)
            groups = by_block.get(index, [])
            block_stats = None if stats is None else move_stats(
                {n: stats[n] for g in groups for n in g.linears if n in stats}, device)
            if groups:
                dense.update(_dense_copy(model, groups))
                block_perms, summary, _ = _fix_block(model, index, len(blocks), groups, method, pruner, pattern,
                                                     block_stats, spec, train_in, val_in, settings, done)
                perms.update(block_perms)
                summaries.append(summary)
                if on_block_end is not None:
                    on_block_end(dict(perms), list(summaries))
            if index + 1 < len(blocks):
                with settings.autocast():
                    advance_block_inputs(block, train_in)
                    advance_block_inputs(block, val_in)
            _restore(model, dense)  # the pruned block is needed only for the inputs of the next one
            block.to(host)
    finally:
        _restore(model, dense)
        for block in blocks:
            block.to(host)
        model.train(was_training)
    return perms, summaries
