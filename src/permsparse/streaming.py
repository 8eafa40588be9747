"""Block-local learning with the blocks streamed from a checkpoint's safetensors shards (``learning.stream=true``).

The in-memory block mode (:mod:`permsparse.block_local`) keeps the whole model on the host and moves one block at a
time to the device. Here the model is never whole anywhere: :class:`StreamedModel` builds it from its config on the
``meta`` device, loads only what is outside the blocks (embeddings, final norm, head) onto the host, and
:meth:`StreamedModel.block` reads one block's tensors from the checkpoint's shards (:class:`CheckpointIndex`, lazily
with ``safetensors.safe_open``) onto the device and puts it back on ``meta`` when done.

:func:`stream_block_local` walks the blocks once, in order. For each block it calibrates on the block's cached
inputs, learns the block's permutations with the in-memory learner (``_learn_block``), prunes the block with them,
advances the cached training, validation, calibration and evaluation inputs through it, optionally writes the
pruned block to a shard of a new checkpoint (:class:`PrunedCheckpoint`), and releases it. The dense and identity
baselines are walked in the same pass, on their own cached evaluation inputs. Perplexity is the evaluation windows'
hidden states after the last block, through the final norm and the head (:func:`streamed_perplexity` alone).
docs/method.md §4.8 describes what it keeps in memory and what it does not do.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from permsparse.block_local import BlockSettings, _by_block, _dense_copy, _fix_block, _restore
from permsparse.data.text import next_token_nll
from permsparse.errors import ConfigError
from permsparse.models.binding import BindingGroup, BindingSpec, get_spec
from permsparse.permutation.learned import LearnedPermutation
from permsparse.prune import GroupReport, PruneReport, _perm_for, prune_group
from permsparse.sparsity.base import LayerStats, Pruner
from permsparse.sparsity.calibration import (
    BlockInputs,
    _model_device,
    advance_block_inputs,
    block_stats,
    capture_block_inputs,
    hidden_of,
)
from permsparse.sparsity.nm import NMPattern
from permsparse.utils.io import atomic_write, atomic_write_json

__all__ = ["INDEX_FILE", "SINGLE_FILE", "CheckpointIndex", "StreamedModel", "PrunedCheckpoint", "StreamResult",
           "stream_block_local", "streamed_perplexity", "PHASES"]

#: the two layouts of a Hugging Face safetensors checkpoint: an index and its shards, or one file (transformers'
#: own names for them)
INDEX_FILE = SAFE_WEIGHTS_INDEX_NAME
SINGLE_FILE = SAFE_WEIGHTS_NAME
#: what :func:`stream_block_local` can evaluate, in the order it walks them per block
PHASES = ("dense", "pruned", "identity")


def _list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _under(name: str, prefix: str) -> bool:
    return not prefix or name.startswith(prefix + ".")


class CheckpointIndex:
    """Where every tensor of a Hugging Face checkpoint folder is: ``model.safetensors.index.json`` and its shards, or
    one ``model.safetensors``. Tensors are read lazily, by name, with ``safetensors.safe_open`` (never a whole file);
    every error names the folder and what is missing."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"{self.folder}: no such folder; streaming reads a Hugging Face checkpoint folder "
                              f"({INDEX_FILE} and its shards, or {SINGLE_FILE})")
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"{index}: not a safetensors index (it needs a 'weight_map'): {err}") from None
            absent = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if absent:
                raise ConfigError(f"{index} names shards that are not in {self.folder}: {_list(absent)}")
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            found = sorted(p.name for p in self.folder.iterdir())
            raise ConfigError(f"{self.folder} holds no safetensors checkpoint: neither {INDEX_FILE} nor {SINGLE_FILE} "
                              f"(it holds {_list(found) or 'nothing'}); save the model with save_pretrained "
                              "(safetensors is its default) to stream it")
        self.weight_map: dict[str, str] = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self, prefix: str = "") -> list[str]:
        """Every tensor name under the module ``prefix`` (``""``: all), sorted."""
        return sorted(n for n in self.weight_map if _under(n, prefix))

    def _file(self, name: str) -> Path:
        if name not in self.weight_map:
            raise ConfigError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        return self.folder / self.weight_map[name]

    def shapes(self, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """The shapes of ``names``, from the shards' headers (no tensor data is read)."""
        out = {}
        for file, group in self._by_file(names).items():
            with safe_open(file, framework="pt") as f:
                out.update({n: tuple(f.get_slice(n).get_shape()) for n in group})
        return out

    def read(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The tensors ``names``, read from their shards straight onto ``device`` (one ``safe_open`` per shard)."""
        out = {}
        for file, group in self._by_file(names).items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                out.update({n: f.get_tensor(n) for n in group})
        return out

    def _by_file(self, names: Iterable[str]) -> dict[Path, list[str]]:
        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ConfigError(f"{self.folder}: the checkpoint has no tensor {_list(missing)} (it has "
                              f"{len(self.weight_map)} tensors); is it a checkpoint of this model?")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._file(n), []).append(n)
        return by_file

    def load(self, expected: Mapping[str, Tensor], prefix: str, device: torch.device | str) -> dict[str, Tensor]:
        """The checkpoint's tensors for ``expected`` (a module's ``state_dict()``, names relative to ``prefix``; meta
        tensors are fine), checked for presence and shape, cast to each expected dtype, on ``device``. Tensors under
        ``prefix`` that the module does not have (stale buffers of old checkpoints) are not read."""
        full = {(f"{prefix}.{k}" if prefix else k): k for k in expected}
        missing = [n for n in full if n not in self.weight_map]
        if missing:
            raise ConfigError(f"{self.folder}: the checkpoint has no tensor {_list(missing)} for the module "
                              f"{prefix or '(root)'!r}; is it a checkpoint of this model?")
        shapes = self.shapes(full)
        wrong = [f"{n}: {shapes[n]} in the checkpoint, {tuple(expected[k].shape)} in the model"
                 for n, k in full.items() if shapes[n] != tuple(expected[k].shape)]
        if wrong:
            raise ConfigError(f"{self.folder}: shape mismatch for {'; '.join(wrong[:5])}; does config.json describe "
                              "this checkpoint?")
        tensors = self.read(full, device)
        return {k: tensors[n].to(expected[k].dtype) for n, k in full.items()}


class StreamedModel:
    """A Hugging Face causal LM of a checkpoint folder whose blocks live on the ``meta`` device until one is needed.

    Built from ``config.json`` alone (``accelerate.init_empty_weights``: parameters on ``meta``, buffers such as the
    rotary ``inv_freq`` computed on the host as usual); the modules outside the blocks (embeddings, final norm,
    head, tied as the config says) are loaded from the checkpoint onto the host in ``dtype``. The blocks are the
    binding spec's (a registered spec: discovery needs a forward pass). :meth:`block` loads one.
    """

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from permsparse.models.loaders import causal_lm_class

        self.index = CheckpointIndex(folder)
        self.folder = self.index.folder
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not (self.folder / "config.json").is_file():
            raise ConfigError(f"{self.folder} has no config.json: streaming builds the model from its config")
        config = AutoConfig.from_pretrained(self.folder)
        with init_empty_weights(include_buffers=False):
            model = causal_lm_class(config).from_config(config, dtype=dtype)
        model.tie_weights()  # the empty-weights context re-creates each registered parameter: tie them again
        self.model = model.eval()
        self.prefixes = self.spec.block_prefixes(model)
        if not self.prefixes:
            raise ConfigError(f"{type(model).__name__}: its binding spec lists no blocks; streaming needs them")
        self._load_rest()

    @property
    def spec(self) -> BindingSpec:
        """The model's binding spec (again on every call: ``prune.skip_indivisible`` may mark groups dense)."""
        return get_spec(self.model, discover=False)

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(p) for p in self.prefixes]

    def _in_block(self, name: str) -> bool:
        return any(_under(name, p) for p in self.prefixes)

    def _load_rest(self) -> None:
        """Load every parameter and persistent buffer outside the blocks; a tied alias absent from the checkpoint
        (``lm_head.weight`` tied to the embeddings) is tied again afterwards."""
        rest = {n: t for n, t in self.model.state_dict(keep_vars=True).items() if not self._in_block(n)}
        aliases: dict[int, list[str]] = {}
        for name, tensor in rest.items():
            aliases.setdefault(id(tensor), []).append(name)
        chosen = {}
        for names in aliases.values():
            present = [n for n in names if n in self.index]
            if not present:
                raise ConfigError(f"{self.folder}: the checkpoint has no tensor {names[0]!r} (outside the blocks)")
            chosen[present[0]] = rest[present[0]]
        self.model.load_state_dict(self.index.load(chosen, "", "cpu"), assign=True, strict=False)
        if any(len(names) > 1 for names in aliases.values()):
            self.model.tie_weights()

    def materialised(self) -> list[int]:
        """The blocks with any parameter off the ``meta`` device (at most one, outside :meth:`block` none)."""
        return [i for i, b in enumerate(self.blocks) if any(p.device.type != "meta" for p in b.parameters())]

    @contextmanager
    def block(self, index: int, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
        """Block ``index`` loaded from the checkpoint onto ``device`` (its parameters and persistent buffers; its
        other buffers move along), put back on ``meta`` on exit, also on error."""
        block, prefix = self.blocks[index], self.prefixes[index]
        try:
            block.load_state_dict(self.index.load(block.state_dict(), prefix, device), assign=True, strict=True)
            block.to(device)
            yield block
        finally:
            self.release(index)

    def release(self, index: int) -> None:
        """Put block ``index``'s parameters back on ``meta`` (their memory is freed) and its buffers on the host."""
        from accelerate.utils import set_module_tensor_to_device

        block = self.blocks[index]
        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta", clear_cache=False)
        for name, _ in list(block.named_buffers()):
            set_module_tensor_to_device(block, name, "cpu", clear_cache=False)

    def output_head(self) -> tuple[nn.Module, nn.Module]:
        """``(final norm, head)``: what turns the last block's hidden state into logits (a Hugging Face decoder's
        ``norm`` and output embeddings; a final logit soft-cap is not supported)."""
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        norm, head = getattr(decoder, "norm", None), self.model.get_output_embeddings()
        config = self.model.config.get_text_config()
        if norm is None or head is None or getattr(config, "final_logit_softcapping", None):
            raise ConfigError(f"{type(self.model).__name__}: streamed evaluation needs a decoder with a final 'norm', "
                              "an output head and no final logit soft-cap")
        return norm, head


class PrunedCheckpoint:
    """A new Hugging Face checkpoint folder written block by block: one shard per block as it is pruned
    (:meth:`write_block`), then the tensors outside the blocks, the index and ``config.json`` (:meth:`finish`).
    ``from_pretrained`` loads it, and :class:`StreamedModel` streams it."""

    def __init__(self, streamed: StreamedModel, folder: str | os.PathLike) -> None:
        self.streamed, self.folder = streamed, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.total = len(streamed.prefixes) + 1
        self.weight_map: dict[str, str] = {}
        self.size = 0

    def _save(self, tensors: dict[str, Tensor], shard: int) -> None:
        from safetensors.torch import save

        name = f"model-{shard:05d}-of-{self.total:05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write(self.folder / name, lambda f: f.write(save(tensors, metadata={"format": "pt"})))
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.size += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_block(self, index: int, block: nn.Module) -> None:
        prefix = self.streamed.prefixes[index]
        self._save({f"{prefix}.{k}": v for k, v in block.state_dict().items()}, index + 1)

    def finish(self) -> Path:
        """The tensors outside the blocks (those the source checkpoint stores), the index and the config."""
        state = self.streamed.model.state_dict()
        self._save({n: state[n] for n in self.streamed.index.names() if n in state and not self.streamed._in_block(n)},
                   self.total)
        atomic_write_json(self.folder / INDEX_FILE, {"metadata": {"total_size": self.size},
                                                     "weight_map": dict(sorted(self.weight_map.items()))})
        self.streamed.model.config.save_pretrained(self.folder)
        for extra in ("generation_config.json",):
            if (self.streamed.folder / extra).is_file():
                shutil.copyfile(self.streamed.folder / extra, self.folder / extra)
        return self.folder


@dataclass
class StreamResult:
    """What :func:`stream_block_local` returns: the learned permutations (``group -> (d_in,)``), one summary per
    block (as :func:`permsparse.block_local.learn_block_local`), the pruning report of every pruned phase
    (``pruned``, ``identity``) and ``{phase: {eval set: perplexity}}``."""

    perms: dict[str, Tensor]
    blocks: list[dict]
    reports: dict[str, PruneReport]
    metrics: dict[str, dict[str, float]]
    seconds: float = 0.0


@dataclass
class _Phase:
    """One version of the model walked through the blocks: ``dense``, ``identity`` (pruned without a permutation),
    ``pruned`` (with the learned or given permutations). ``evals``: its cached evaluation inputs; ``calib``: its own
    calibration inputs (sequential statistics only); ``report``: its pruning."""

    name: str
    perms: Mapping[str, Tensor] | None = None
    learn: Callable[[int, list[BindingGroup], Mapping[str, LayerStats] | None], list[GroupReport]] | None = None
    evals: dict[str, BlockInputs] = field(default_factory=dict)
    calib: BlockInputs | None = None
    report: PruneReport | None = None
    writer: PrunedCheckpoint | None = None


def _eval_forward(model: nn.Module, batch: Tensor) -> Any:
    """A batch of evaluation windows as :func:`permsparse.data.text.perplexity` runs it."""
    return model(input_ids=batch.to(_model_device(model)), use_cache=False)


def _walk(streamed: StreamedModel, phases: list[_Phase], pruner: Pruner | None, pattern: NMPattern,
          calibration_batches: Iterable[Any] | None, sequential: bool, device: torch.device,
          forward: Callable | None, eval_sets: Mapping[str, Tensor], eval_batch_size: int,
          progress: bool) -> dict[str, dict[str, float]]:
    """Walk every block once for every phase (see the module docstring); return ``{phase: {eval set: ppl}}``."""
    model, n_blocks = streamed.model, len(streamed.prefixes)
    spec = streamed.spec
    by_block = _by_block(spec, model)
    pruning = [p for p in phases if p.name != "dense"]
    needs_stats = bool(pruning) and pruner is not None and (pruner.needs_stats or pruner.needs_hessian)
    first = streamed.blocks[0]
    calib = None
    if needs_stats:
        if calibration_batches is None:
            raise ValueError(f"pruner {type(pruner).__name__} needs calibration statistics; pass calibration_batches")
        calib = capture_block_inputs(model, first, calibration_batches, forward, progress)
        for phase in pruning if sequential else ():
            phase.calib = list(calib)  # one stream per pruned phase: each is calibrated on its own pruned blocks
    windows = {name: list(w.split(eval_batch_size)) for name, w in eval_sets.items()}
    for name, batches in windows.items():
        captured = capture_block_inputs(model, first, batches, _eval_forward, progress)
        for phase in phases:
            phase.evals[name] = list(captured)
    for phase in pruning:
        phase.report = PruneReport(pattern)
    hessian = bool(pruner is not None and pruner.needs_hessian)
    for index in tqdm(range(n_blocks), desc="streamed blocks", disable=not progress):
        with streamed.block(index, device) as block:
            groups = by_block.get(index, [])
            names = [name for g in groups for name in g.linears]
            more = index + 1 < n_blocks
            dense_stats = None
            if calib is not None and not sequential:  # the dense statistics: the dense model's blocks before this one
                dense_stats = block_stats(model, block, names, calib, hessian) if names else {}
                if more:
                    advance_block_inputs(block, calib)
            for phase in phases:
                if phase.name == "dense":
                    for inputs in phase.evals.values():
                        advance_block_inputs(block, inputs)
                    continue
                stats = dense_stats
                if phase.calib is not None:
                    stats = block_stats(model, block, names, phase.calib, hessian) if names else {}
                dense = _dense_copy(model, groups)
                if phase.learn is not None:
                    reports = phase.learn(index, groups, stats)
                else:
                    reports = [prune_group(model, g, pruner, pattern, _perm_for(phase.perms, g), stats)
                               for g in groups]
                phase.report.groups.extend(reports)  # type: ignore[union-attr]
                if phase.calib is not None and more:
                    advance_block_inputs(block, phase.calib)
                for inputs in phase.evals.values():
                    advance_block_inputs(block, inputs)
                if phase.writer is not None:
                    phase.writer.write_block(index, block)
                _restore(model, dense)  # the next phase starts from the dense block
    for phase in phases:
        if phase.writer is not None:
            phase.writer.finish()
    return {phase.name: {name: _perplexity(streamed, phase.evals[name], batches, device)
                         for name, batches in windows.items()} for phase in phases if windows}


@torch.no_grad()
def _perplexity(streamed: StreamedModel, hidden: BlockInputs, batches: list[Tensor], device: torch.device) -> float:
    """``exp`` of the mean next-token NLL of ``batches`` from their last block's hidden states: the final norm and the
    head run on ``device`` (and go back to the host)."""
    norm, head = streamed.output_head()
    nll, count = 0.0, 0
    try:
        norm.to(device)
        head.to(device)
        for (args, kwargs), ids in zip(hidden, batches, strict=True):
            batch_nll, batch_count = next_token_nll(head(norm(hidden_of(args, kwargs).to(device))), ids)
            nll, count = nll + batch_nll, count + batch_count
    finally:
        norm.to("cpu")
        head.to("cpu")
    return math.exp(nll / count)


def stream_block_local(streamed: StreamedModel, method: LearnedPermutation, pruner: Pruner, pattern: NMPattern | str,
                       train_batches: Iterable[Any], val_batches: Iterable[Any], settings: BlockSettings, *,
                       calibration_batches: Iterable[Any] | None = None, sequential: bool = False,
                       eval_sets: Mapping[str, Tensor] | None = None, eval_batch_size: int = 4,
                       phases: Sequence[str] = PHASES, forward: Callable | None = None,
                       done: Mapping[int, tuple[dict[str, Tensor], dict]] | None = None,
                       on_block_end: Callable[[dict[str, Tensor], list[dict]], None] | None = None,
                       pruned_dir: str | os.PathLike | None = None) -> StreamResult:
    """Block-local learning of ``streamed``'s permutations with one block materialised at a time, in one pass that
    also prunes, evaluates and (``pruned_dir``) writes the pruned model.

    Block ``k`` learns exactly as in :func:`permsparse.block_local.learn_block_local` (the same ``_learn_block``, on
    the outputs of blocks ``0 .. k-1`` pruned with their learned permutations). Its statistics come from
    ``calibration_batches`` walked through the blocks before it: dense ones (``sequential=False``: what
    ``collect_stats`` gives on the dense model, the in-memory run's statistics) or pruned ones
    (``sequential=True``: what ``collect_stats_sequential`` / ``prune_model_sequential`` give; the block then
    learns with the statistics it is finally pruned with). ``eval_sets`` (``{metric: (n, seq_len) windows}``) are
    scored by perplexity, batch by batch of ``eval_batch_size`` as :func:`permsparse.data.text.perplexity` does,
    for every phase in ``phases`` (``dense``, ``pruned``, ``identity``). ``done`` and ``on_block_end`` as in
    ``learn_block_local`` (resume, block checkpoints); ``on_block_end`` runs while the block is materialised.
    """
    start = time.perf_counter()
    pattern = NMPattern.parse(pattern)
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or "pruned" not in phases:
        raise ValueError(f"phases={list(phases)}: choose among {PHASES}, 'pruned' included")
    model, n_blocks, spec = streamed.model, len(streamed.prefixes), streamed.spec
    device = torch.device(settings.device)
    done = dict(done or {})
    first = streamed.blocks[0]
    train_in = capture_block_inputs(model, first, train_batches, forward, settings.progress)
    val_in = capture_block_inputs(model, first, val_batches, forward, settings.progress)
    perms: dict[str, Tensor] = {}
    summaries: list[dict] = []

    def learn(index: int, groups: list[BindingGroup], stats: Mapping[str, LayerStats] | None) -> list[GroupReport]:
        reports: list[GroupReport] = []
        if groups:
            block_perms, summary, reports = _fix_block(model, index, n_blocks, groups, method, pruner, pattern, stats,
                                                       spec, train_in, val_in, settings, done)
            perms.update(block_perms)
            summaries.append(summary)
            if on_block_end is not None:
                on_block_end(dict(perms), list(summaries))
        if index + 1 < n_blocks:
            block = streamed.blocks[index]
            with settings.autocast():
                advance_block_inputs(block, train_in)
                advance_block_inputs(block, val_in)
        return reports

    writer = PrunedCheckpoint(streamed, pruned_dir) if pruned_dir is not None else None
    walked = [_Phase("dense")] if "dense" in phases else []
    walked.append(_Phase("pruned", learn=learn, writer=writer))
    walked += [_Phase("identity")] if "identity" in phases else []
    was_training = model.training
    model.eval()
    try:
        metrics = _walk(streamed, walked, pruner, pattern, calibration_batches, sequential, device, forward,
                        dict(eval_sets or {}), eval_batch_size, settings.progress)
    finally:
        model.train(was_training)
    reports = {p.name: p.report for p in walked if p.report is not None}
    return StreamResult(perms, summaries, reports, metrics, time.perf_counter() - start)


def streamed_perplexity(streamed: StreamedModel, windows: Tensor, batch_size: int = 4,
                        device: torch.device | str = "cpu", pruner: Pruner | None = None,
                        pattern: NMPattern | str = "2:4", perms: Mapping[str, Tensor] | None = None,
                        calibration_batches: Iterable[Any] | None = None, sequential: bool = False,
                        forward: Callable | None = None, progress: bool = False) -> float:
    """Perplexity of ``streamed`` on ``(n, seq_len)`` ``windows``, one block materialised at a time: the dense model
    (``pruner=None``), or the model pruned with ``pruner`` and ``perms`` (``None``: the identity) on statistics from
    ``calibration_batches`` (dense, or ``sequential``). Equals :func:`permsparse.data.text.perplexity` on the
    in-memory model, dense or pruned the same way (``prune_model`` / ``prune_model_sequential``)."""
    phase = _Phase("dense") if pruner is None else _Phase("pruned", perms=perms)
    was_training = streamed.model.training
    streamed.model.eval()
    try:
        metrics = _walk(streamed, [phase], pruner, NMPattern.parse(pattern), calibration_batches, sequential,
                        torch.device(device), forward, {"ppl": windows}, batch_size, progress)
    finally:
        streamed.model.train(was_training)
    return metrics[phase.name]["ppl"]
