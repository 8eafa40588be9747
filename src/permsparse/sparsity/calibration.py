"""Calibration statistics of linear-layer inputs: per-channel sum of squares, token count, ``X^T X``.

Two modes (docs/method.md §2): :func:`collect_stats` runs the dense model once with hooks on
all requested layers (the paper's setting); :func:`collect_stats_sequential` calibrates block by
block on the outputs of the already-pruned earlier blocks (Wanda / SparseGPT as published).
Accumulation runs in float64 by default. Statistics are plain sums, so shards from several
ranks combine exactly with :func:`merge_stats` / :func:`all_reduce_stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from permsparse.sparsity.base import LayerStats

__all__ = [
    "collect_stats",
    "collect_stats_sequential",
    "default_forward",
    "merge_stats",
    "merge_stats_dicts",
    "all_reduce_stats",
    "move_stats",
    "block_hidden_state",
    "capture_block_inputs",
    "advance_block_inputs",
    "block_stats",
    "run_block",
    "hidden_of",
    "BlockInputs",
]

ForwardFn = Callable[[nn.Module, Any], Any]
OnBlockFn = Callable[[int, dict[str, LayerStats]], None]
#: the captured calls of one block: ``(positional args, keyword args)`` per batch
BlockInputs = list[tuple[tuple, dict[str, Any]]]

#: keyword arguments of a captured block call that hold a KV cache; cleared so re-running a block
#: on the same inputs does not grow (or read) a cache
_CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")
#: keyword names under which a block may receive its hidden state
_HIDDEN_KWARGS = ("hidden_states", "x", "input")


class _StopForward(Exception):
    """Raised by the capture hook on the first block to stop the model's forward early."""


# ---------------------------------------------------------------------------------------- helpers
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``batch`` on the model's device: a tensor as ``model(batch)``, a mapping as ``model(**batch)``.

    A tuple/list batch is taken as ``(inputs, labels, ...)`` and only its first element is passed.
    """
    batch = _to_device(batch, _model_device(model))
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("calibration: empty tuple/list batch")
        batch = batch[0]
        return model(**batch) if isinstance(batch, Mapping) else model(batch)
    return model(batch)


class _Accumulator:
    """Running sums for one layer's input."""

    def __init__(self, name: str, hessian: bool, dtype: torch.dtype) -> None:
        self.name = name
        self.hessian = hessian
        self.dtype = dtype
        self.sq_sum: Tensor | None = None
        self.xtx: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach()
        d_in = x.shape[-1]
        x = x.reshape(-1, d_in).to(self.dtype)
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(d_in, dtype=self.dtype, device=x.device)
            if self.hessian:
                self.xtx = torch.zeros(d_in, d_in, dtype=self.dtype, device=x.device)
        elif self.sq_sum.shape[0] != d_in:
            raise ValueError(f"{self.name}: input width changed from {self.sq_sum.shape[0]} to {d_in}")
        self.sq_sum += x.pow(2).sum(dim=0).to(self.sq_sum.device)
        if self.xtx is not None:
            self.xtx += (x.T @ x).to(self.xtx.device)
        self.count += x.shape[0]

    def stats(self) -> LayerStats:
        if self.sq_sum is None:
            raise ValueError(f"calibration: layer {self.name!r} received no input during calibration")
        return LayerStats(sq_sum=self.sq_sum, count=self.count, hessian=self.xtx)


def _resolve(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    modules: dict[str, nn.Module] = {}
    missing = []
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            missing.append(name)
    if missing:
        raise ValueError(
            f"calibration: no module named {', '.join(map(repr, missing))} in {type(model).__name__}"
        )
    return modules


@contextmanager
def _hooks(model: nn.Module, names: Sequence[str], hessian: bool, dtype: torch.dtype):
    """Install input hooks on ``names``; yields the accumulators; always removes the hooks."""
    modules = _resolve(model, names)
    accs = {name: _Accumulator(name, hessian, dtype) for name in modules}
    handles = []

    def make_hook(acc: _Accumulator) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if not isinstance(x, Tensor):
                raise TypeError(f"calibration: cannot find the input tensor of layer {acc.name!r}")
            acc.add(x)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(accs[name]), with_kwargs=True))
        yield accs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _total(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def move_stats(stats: dict[str, LayerStats], device: torch.device | str | None) -> dict[str, LayerStats]:
    """The same statistics on ``device`` (``None``: unchanged)."""
    if device is None:
        return stats
    return {
        k: LayerStats(
            sq_sum=s.sq_sum.to(device),
            count=s.count,
            hessian=None if s.hessian is None else s.hessian.to(device),
        )
        for k, s in stats.items()
    }


# ---------------------------------------------------------------------------------------- public API
def collect_stats(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[Any],
    hessian: bool = False,
    forward: ForwardFn | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    store_device: torch.device | str | None = None,
) -> dict[str, LayerStats]:
    """Run every batch through ``model`` once and return the input statistics of each named layer.

    Statistics are unnormalised sums over all tokens (all leading dims flattened), accumulated in
    ``dtype`` on the input's device (then moved to ``store_device`` if given). The model runs in
    eval mode under ``torch.no_grad()``; its mode is restored and the hooks removed even on error.
    """
    fwd = forward or default_forward
    with _eval_mode(model), torch.no_grad(), _hooks(model, layer_names, hessian, dtype) as accs:
        for batch in tqdm(batches, total=_total(batches), desc="calibration", disable=not progress):
            fwd(model, batch)
    return move_stats({name: acc.stats() for name, acc in accs.items()}, store_device)


def _sanitize_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def block_hidden_state(output: Any) -> Tensor:
    """The hidden state a transformer block returns: the tensor itself, or the first element of a tuple
    (Hugging Face decoder layers). Used by calibration and by the distillation capture of the Lightning modules."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"a block returned {type(output).__name__}; expected a tensor or a tuple whose first "
        "element is the hidden state"
    )


def hidden_of(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """The hidden-state argument of a captured block call (the first positional one, or ``hidden_states``)."""
    if args:
        return args[0]
    for key in _HIDDEN_KWARGS:
        if key in kwargs:
            return kwargs[key]
    raise ValueError("calibration: cannot find the hidden-state argument of the captured block call")


def _replace_hidden(args: tuple, kwargs: dict[str, Any], hidden: Tensor) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    for key in _HIDDEN_KWARGS:
        if key in kwargs:
            return args, {**kwargs, key: hidden}
    raise ValueError("calibration: cannot find the hidden-state argument of the captured block call")


def collect_stats_sequential(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    block_layer_names: Sequence[Sequence[str]],
    batches: Iterable[Any],
    on_block: OnBlockFn,
    hessian: bool = False,
    forward: ForwardFn | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    store_device: torch.device | str | None = None,
) -> dict[str, LayerStats]:
    """Block-by-block calibration (Wanda / SparseGPT): block i sees the outputs of pruned blocks < i.

    Captures the positional and keyword inputs of ``blocks[0]`` per batch (:func:`capture_block_inputs`), then for
    each block:
    collects stats of ``block_layer_names[i]`` (names relative to ``model``), calls
    ``on_block(i, stats_i)`` (which prunes the block in place; under DDP it should all-reduce the
    stats first), and re-runs the block to produce the next block's inputs (:func:`advance_block_inputs`; block-local
    learning, :mod:`permsparse.block_local`, walks the blocks the same way). Keyword inputs (masks,
    position embeddings) are reused as captured for every block; KV caches are dropped.
    Returns the stats of all blocks.
    """
    blocks = list(blocks)
    if len(block_layer_names) != len(blocks):
        raise ValueError(
            f"calibration: {len(blocks)} blocks but {len(block_layer_names)} lists of layer names"
        )
    if not blocks:
        return {}
    all_stats: dict[str, LayerStats] = {}
    with _eval_mode(model), torch.no_grad():
        captured = capture_block_inputs(model, blocks[0], batches, forward=forward, progress=progress)
        for i, block in enumerate(tqdm(blocks, desc="sequential calibration", disable=not progress)):
            stats_i = block_stats(model, block, block_layer_names[i], captured, hessian, dtype)
            on_block(i, stats_i)
            all_stats.update(move_stats(stats_i, store_device))
            if i + 1 < len(blocks):
                advance_block_inputs(block, captured)
    return all_stats


@torch.no_grad()
def block_stats(model: nn.Module, block: nn.Module, layer_names: Sequence[str], inputs: BlockInputs,
                hessian: bool = False, dtype: torch.dtype = torch.float64) -> dict[str, LayerStats]:
    """The input statistics of ``layer_names`` (names relative to ``model``, inside ``block``) over ``block``'s run
    on every captured input (:func:`run_block`: on the block's device): one block's share of
    :func:`collect_stats_sequential`, also what the streamed run (:mod:`permsparse.streaming`) calibrates with."""
    with _eval_mode(block), _hooks(model, layer_names, hessian, dtype) as accs:
        for captured in inputs:
            run_block(block, captured)
    return {name: acc.stats() for name, acc in accs.items()}


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Any], forward: ForwardFn | None = None,
                         progress: bool = True) -> BlockInputs:
    """The positional and keyword inputs of ``block`` (the first block) for every batch, in order: the model's
    forward runs up to that block and is stopped there. KV caches are dropped from the keyword inputs."""
    fwd = forward or default_forward
    captured: BlockInputs = []

    def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.append((tuple(args), _sanitize_kwargs(kwargs)))
        raise _StopForward

    with _eval_mode(model), torch.no_grad():
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for batch in tqdm(batches, total=_total(batches), desc="capture inputs", disable=not progress):
                try:
                    fwd(model, batch)
                except _StopForward:
                    continue
                raise RuntimeError("calibration: the forward pass never reached blocks[0]")
        finally:
            handle.remove()
    if not captured:
        raise ValueError("calibration: no calibration batches")
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: tuple[tuple, dict[str, Any]]) -> Tensor:
    """``block``'s hidden-state output for one captured input, computed on the block's device and returned on the
    device the input is stored on (the host, when the block was moved to an accelerator)."""
    args, kwargs = inputs
    device = _model_device(block)
    store = hidden_of(args, kwargs).device
    out = block(*_to_device(args, device), **_to_device(kwargs, device))
    return block_hidden_state(out).to(store)


def advance_block_inputs(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace, in place, every captured input's hidden state by ``block``'s output on it: the inputs of the next
    block (keyword inputs such as masks and position embeddings are kept as captured)."""
    for k, (args, kwargs) in enumerate(inputs):
        inputs[k] = _replace_hidden(args, kwargs, run_block(block, (args, kwargs)))


def merge_stats(a: LayerStats, b: LayerStats) -> LayerStats:
    """Sum of two stats of the same layer over disjoint token sets (e.g. two ranks' shards)."""
    if a.sq_sum.shape != b.sq_sum.shape:
        raise ValueError(f"merge_stats: shapes differ: {tuple(a.sq_sum.shape)} vs {tuple(b.sq_sum.shape)}")
    if (a.hessian is None) != (b.hessian is None):
        raise ValueError("merge_stats: one of the stats has a Hessian and the other does not")
    hessian = None if a.hessian is None else a.hessian + b.hessian.to(a.hessian.device)  # type: ignore[union-attr]
    return LayerStats(
        sq_sum=a.sq_sum + b.sq_sum.to(a.sq_sum.device), count=a.count + b.count, hessian=hessian
    )


def merge_stats_dicts(a: Mapping[str, LayerStats], b: Mapping[str, LayerStats]) -> dict[str, LayerStats]:
    """Layer-wise :func:`merge_stats`; a layer present in only one dict is copied through."""
    out = dict(a)
    for name, s in b.items():
        out[name] = merge_stats(out[name], s) if name in out else s
    return out


def all_reduce_stats(stats: dict[str, LayerStats], group: Any = None) -> dict[str, LayerStats]:
    """Sum stats across ``torch.distributed`` ranks in place (no-op when not initialised); returns ``stats``.

    Every rank must hold the same layer names with the same shapes and Hessian presence; tensors
    must live on a device the backend supports (CUDA for NCCL).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return stats
    for name in sorted(stats):
        s = stats[name]
        dist.all_reduce(s.sq_sum, group=group)
        if s.hessian is not None:
            dist.all_reduce(s.hessian, group=group)
        count = torch.tensor([s.count], dtype=torch.int64, device=s.sq_sum.device)
        dist.all_reduce(count, group=group)
        s.count = int(count.item())
    return stats
