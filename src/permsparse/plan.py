"""The memory and time planner: what a learned run holds per device, before anything is loaded (docs/planning.md).

``python -m permsparse.plan <overrides>`` composes the same config as ``train.py`` and prints, per device, the bytes
of the frozen weights, the pruner scores and masks, the cost parameters, their gradients and optimiser states, the
gradient workspaces, the Sinkhorn intermediates, the masked weights and activations autograd keeps for one step and
the distillation teacher's capture, then the FLOPs of one step and whether the total fits a device memory
(``plan.device_memory=80GB``; default: the GPU's own, on CPU the host's RAM)::

    python -m permsparse.plan model=llama2_7b learning.mode=block trainer=gpu plan.device_memory=24GB

The model is built on the meta device from its config alone (no weights, no network when the config is local; a
hub model without a cached config falls back to the shape written in its ``conf/model/*.yaml``). Byte counts of
tensors the learned method allocates follow its code (:mod:`permsparse.permutation.learned`) and are exact;
activations are the tensors autograd saves in one traced training step of the meta model (an estimate: the fused
attention kernel is modelled, allocator slack is not). ``train.py`` runs the same plan first
(:func:`check_plan`): a run that cannot fit a declared (or a GPU's known) memory stops with the table.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from permsparse.config import (
    LEARNING_MODES,
    accelerator_kind,
    block_steps,
    build_method,
    e2e_steps,
    strategy_kind,
)
from permsparse.errors import ConfigError
from permsparse.models.binding import BindingGroup, get_spec
from permsparse.permutation.apply import native_bf16_matmul
from permsparse.permutation.foldable import head_layout
from permsparse.permutation.learned import LearnedPermutation
from permsparse.prune import check_model_divisible
from permsparse.sparsity.calibration import block_hidden_state
from permsparse.sparsity.nm import NMPattern

__all__ = ["MODES", "LinearPlan", "GroupPlan", "Item", "Plan", "Trace", "meta_model", "plan_run", "check_plan",
           "parse_bytes", "format_bytes", "compose_config", "main"]

log = logging.getLogger("permsparse")

MODES = LEARNING_MODES  # ``learning.mode``: end to end or block-local (:mod:`permsparse.block_local`)
F32 = 4  # bytes of a float32 (costs, potentials, optimiser states, scores are float32 whatever the weights)


# ------------------------------------------------------------------------------------------------ sizes


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, key: str = "plan.device_memory") -> int | None:
    """``80GB`` (SI, 80e9), ``80GiB`` (2^30 each), ``24G``, ``8.5e10`` or an integer -> bytes; ``None``/empty -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is invalid: give a size such as 80GB, 80GiB or a number of bytes")
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{key}={value!r} is invalid: give a size such as 80GB (10^9 bytes), 80GiB (2^30 bytes) "
                          "or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Binary units, e.g. ``12.34 GiB``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} FLOP"


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.load.dtype={value!r} is not a torch dtype (float32, bfloat16, float16)")
    return dtype


# --------------------------------------------------------------------------------------- the meta model


def _config_dir() -> Path:
    return Path(os.environ.get("PERMSPARSE_CONF", Path(__file__).resolve().parents[2] / "conf"))


def _hf_config(name_or_path: str, shape: Mapping[str, Any] | None) -> tuple[Any, str]:
    """The transformers config of ``name_or_path``: local (a folder, or the HF cache), then the hub unless offline,
    then the ``shape`` fallback of the model's yaml. Returns ``(config, where it came from)``."""
    from transformers import AutoConfig

    errors = []
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    for local in (True, False) if not offline else (True,):
        try:
            return AutoConfig.from_pretrained(name_or_path, local_files_only=local), \
                f"{name_or_path} ({'local config' if local else 'hub config'})"
        except Exception as err:  # OSError, ValueError, network errors: fall through to the next source
            errors.append(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    if not shape:
        raise ConfigError(f"the planner needs the config of {name_or_path!r} ({errors[-1]}); it is not cached and the "
                          "model yaml has no `shape:` fallback. Download it once, or add model.shape")
    from permsparse.models.loaders import shape_config

    return shape_config(shape), f"{name_or_path}: shape fallback of the model yaml (no config reachable)"


def meta_model(model_cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    """``(model on the meta device, where its architecture came from)``, from a ``model`` config node.

    Hugging Face hub models: their config (local, hub, or the yaml's ``shape`` fallback) and
    ``AutoModelForCausalLM.from_config``; SmolLM2: the cached fp32 folder's config or its ``shape``; the offline ViT
    teachers: their committed architecture record; anything else (tiny models, timm): its loader with
    ``pretrained=False``, called under ``torch.device("meta")``. The weights' dtype is ``model.load.dtype`` (the
    loaders' default, float32, when unset).
    """
    from hydra.utils import instantiate

    from permsparse.models import loaders
    from permsparse.runs import architecture_only

    load = OmegaConf.to_container(model_cfg["load"], resolve=True) if isinstance(model_cfg["load"], DictConfig) \
        else dict(model_cfg["load"])
    assert isinstance(load, dict)
    target = str(load.get("_target_", ""))
    shape = model_cfg.get("shape")
    shape = OmegaConf.to_container(shape, resolve=True) if isinstance(shape, DictConfig) else shape
    dtype = _dtype(load.get("dtype")) or torch.float32
    if target in ("permsparse.models.loaders.load_hf_causal_lm", "permsparse.models.loaders.load_smollm2"):
        if target.endswith("load_smollm2"):
            folder = loaders._cache_root(load.get("cache_dir")) / loaders.SMOLLM2_CACHE_NAME
            if (folder / "config.json").is_file():
                config, source = _hf_config(str(folder), shape)[0], f"SmolLM2 cached config ({folder})"
            elif shape:
                config, source = loaders.shape_config(shape), "SmolLM2: shape of conf/model/smollm2_135m.yaml (not yet cached)"
            else:
                raise ConfigError("the planner needs SmolLM2's shape: model.shape is missing and no cached copy exists")
        else:
            config, source = _hf_config(str(load["name_or_path"]), shape)
        from permsparse.models.qwen2_moe import unfuse_experts

        with torch.device("meta"):
            model = unfuse_experts(loaders.causal_lm_class(config).from_config(config, dtype=dtype))  # as the loader
        if load.get("targets") is not None:
            from permsparse.models.qwen2_5_vl import set_targets

            set_targets(model, load["targets"])
        return model.eval(), source
    if target == "permsparse.models.loaders.load_offline_vit":
        from timm.models.vision_transformer import VisionTransformer

        arch = loaders.offline_vit_info(load.get("dataset", "fashion_mnist"))["arch"]
        with torch.device("meta"):
            model = VisionTransformer(**arch).to(dtype)
        return model.eval(), f"offline ViT teacher ({load.get('dataset', 'fashion_mnist')}), committed architecture"
    with torch.device("meta"):
        built = instantiate(architecture_only(load), _convert_="all")
    model = built[0] if isinstance(built, tuple) else built
    return model.eval(), f"{target} (built on the meta device)"


# ---------------------------------------------------------------------------------------- per group / linear


@dataclass(frozen=True)
class LinearPlan:
    """A bound linear: its shape, weight dtype, block and the number of cost blocks of its group."""

    name: str
    d_out: int
    d_in: int
    itemsize: int
    block: int
    blocks: int  # channel blocks of its group's permutation (``LearnableCost.groups``)

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in

    @property
    def g(self) -> int:
        """Channels per block of its permutation."""
        return self.d_in // self.blocks


@dataclass(frozen=True)
class GroupPlan:
    """A binding group's cost: ``free = blocks / tie`` free ``g x g`` matrices (``LearnableCost.raw``)."""

    name: str
    block: int
    d_in: int
    blocks: int
    tie: int
    linears: tuple[LinearPlan, ...]
    framed: bool = False  # perm.method.base: the group's channels live in a heuristic's frame (an int64 d_in index)

    @property
    def g(self) -> int:
        return self.d_in // self.blocks

    @property
    def free(self) -> int:
        return self.blocks // self.tie

    @property
    def cost_elements(self) -> int:
        return self.free * self.g * self.g

    @property
    def buffer_bytes(self) -> int:
        """Sinkhorn dual potentials (two ``(free, g)`` float32) and the ``warm`` flag (one bool)."""
        return 2 * self.free * self.g * F32 + 1


def _group_plans(model: nn.Module, groups: list[BindingGroup], method: LearnedPermutation,
                 pattern: NMPattern) -> list[GroupPlan]:
    """The cost layout :class:`~permsparse.permutation.learned.LearnedPermutations` builds, computed from shapes."""
    out = []
    for group in groups:
        weights = [model.get_submodule(name).weight for name in group.linears]
        d_in = int(weights[0].shape[1])
        blocks, tie = method.blocks_for(d_in, pattern.m, group.name), 1
        if method.by_heads(group):
            _, num_heads, num_kv_heads = head_layout(group)
            blocks, tie = num_heads, num_heads // num_kv_heads
        linears = tuple(LinearPlan(name, int(w.shape[0]), int(w.shape[1]), w.element_size(), group.block, blocks)
                        for name, w in zip(group.linears, weights, strict=True))
        out.append(GroupPlan(group.name, group.block, d_in, blocks, tie, linears,
                             framed=method.framed(group)))
    return out


# ------------------------------------------------------------------------------------------------- trace


@dataclass
class Trace:
    """What one traced training step on the meta device keeps (bytes) and computes (FLOPs)."""

    saved_by_block: dict[int, int] = field(default_factory=dict)  # -1: outside the blocks (embeddings, head, loss)
    block_output_bytes: dict[int, int] = field(default_factory=dict)  # one block's output hidden state
    output_bytes: int = 0  # the student's task output (logits) alive until backward, when autograd does not save it
    teacher_bytes: int = 0  # the teacher pass's captured block outputs and its task output
    forward_flops: float = 0.0  # teacher + student forward
    backward_flops: float = 0.0
    attention_flops_by_block: dict[int, float] = field(default_factory=dict)  # one forward of each block
    saved: list[tuple[int, tuple[int, ...], torch.dtype, int]] = field(default_factory=list)  # (block, shape, dtype, B)

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved_by_block.values())


class _FusedAttention(torch.autograd.Function):
    """Stand-in for ``scaled_dot_product_attention`` on the meta device, where PyTorch falls back to the math path
    (which saves the ``T x T`` scores). The fused kernels a real run uses (flash on CPU and GPU) save ``q, k, v``, the
    output and a float32 log-sum-exp per query row; so does this. Like them it lays the output out as
    ``(batch, tokens, heads, head_dim)`` in memory, so the usual ``transpose(1, 2).contiguous()`` after it copies
    nothing."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        if q.dim() == 4:
            out = q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _NoPermutations(nn.Module):
    """What the LightningModule needs from its ``permutations`` to run a step: a dense switch and no extra term."""

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        yield

    def regularizer(self) -> None:
        return None


def _example_batch(model: nn.Module, task: str, batch: int, seq_len: int) -> Any:
    if task == "causal_lm":
        return torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    from permsparse.models.discovery import timm_input_size

    size = timm_input_size(model)
    embed = getattr(model, "patch_embed", None)
    if size is None and embed is not None and getattr(embed, "img_size", None) is not None:
        size = (int(embed.proj.in_channels), *(int(s) for s in embed.img_size))  # a ViT built without a registry cfg
    if size is None:
        raise ConfigError(f"the planner cannot tell the input size of {type(model).__name__}: it has no "
                          "pretrained_cfg['input_size']")
    return (torch.zeros(batch, *size, device="meta", dtype=next(model.parameters()).dtype),
            torch.zeros(batch, dtype=torch.long, device="meta"))


def trace_step(module: Any, model: nn.Module, blocks: list[nn.Module], bound: list[str], batch: Any) -> Trace:
    """One training step of ``module`` (a :class:`~permsparse.lit.modules.PermutationModule` around the meta
    ``model``): the teacher pass, the student pass with its loss, and the backward, with the bound weights requiring
    a gradient (the effective weight depends on the permutation). Counts the unique tensors autograd saves, per block
    (by the block whose forward is running), excluding parameters and buffers; and the FLOPs
    (``torch.utils.flop_counter``, attention from :class:`_FusedAttention`'s shapes)."""
    from torch.utils.flop_counter import FlopCounterMode

    trace = Trace()
    persistent = {id(t) for t in [*model.parameters(), *model.buffers()]}
    current: list[int] = [-1]
    seen: dict[int, Tensor] = {}  # id of a saved tensor's storage root -> the root (kept alive: ids stay unique)
    teacher: dict[int, Tensor] = {}  # the teacher pass's outputs: counted as its capture, not again when the loss saves them

    def pack(t: Tensor) -> Tensor:
        root = t._base if t._base is not None else t
        if id(root) not in persistent and id(root) not in seen and id(root) not in teacher:
            seen[id(root)] = root
            block, nbytes = current[0], root.untyped_storage().nbytes()
            trace.saved_by_block[block] = trace.saved_by_block.get(block, 0) + nbytes
            trace.saved.append((block, tuple(root.shape), root.dtype, nbytes))
        return t

    def enter(index: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            current[0] = index
        return hook

    def leave(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            current[0] = -1
            trace.block_output_bytes[index] = block_hidden_state(output).untyped_storage().nbytes()
        return hook

    def attention(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        flops = 4.0 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]  # QK^T and PV, full (no causal skip)
        if torch.is_grad_enabled():
            trace.attention_flops_by_block[current[0]] = trace.attention_flops_by_block.get(current[0], 0.0) + flops
            trace.backward_flops += 2 * flops
        trace.forward_flops += flops
        return _FusedAttention.apply(q, k, v)

    handles = []
    for index, block in enumerate(blocks):
        handles += [block.register_forward_pre_hook(enter(index)), block.register_forward_hook(leave(index))]
    for param in model.parameters():  # frozen, as LearnedPermutations.attach leaves it
        param.requires_grad_(False)
    for name in bound:
        model.get_submodule(name).weight.requires_grad_(True)
    original_forward = module.forward_with_blocks
    teacher_calls: list[int] = []

    def forward_with_blocks(batch: Any) -> tuple[Any, list[Tensor]]:
        output, captured = original_forward(batch)
        if not torch.is_grad_enabled():  # the teacher: everything it returns stays alive until the loss
            roots = {id(r): r for r in (t._base if t._base is not None else t for t in [*captured, output])}
            teacher.update(roots)
            teacher_calls.append(sum(t.untyped_storage().nbytes() for t in roots.values()))
        else:
            trace.output_bytes = output.untyped_storage().nbytes()
            student_output.append(output)
        return output, captured

    student_output: list[Tensor] = []
    module.forward_with_blocks = forward_with_blocks
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = attention  # type: ignore[assignment]
    try:
        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _, _ = module._distill_and_task(batch)
            forward = counter.get_total_flops()
            loss.backward()
        trace.forward_flops += forward
        trace.backward_flops += counter.get_total_flops() - forward
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
        module.forward_with_blocks = original_forward
        for handle in handles:
            handle.remove()
        for name in bound:
            model.get_submodule(name).weight.requires_grad_(False)
    trace.teacher_bytes = sum(teacher_calls)
    if student_output and id(student_output[0]) in {id(r) for r in seen.values()}:
        trace.output_bytes = 0  # saved by autograd already (counted there)
    return trace


# -------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Item:
    """One row of the table: bytes per device, ``exact`` / ``estimate``, and how it is computed."""

    name: str
    bytes: int
    kind: str
    formula: str


@dataclass
class Plan:
    """The plan of one run: its per-device rows, host rows, FLOPs, and the memory it is checked against."""

    title: list[str]
    items: list[Item]
    host: list[Item]
    flops: list[tuple[str, float, str]]
    steps: int
    blocks: int
    device_memory: int | None
    memory_source: str
    enforced: bool  # declared by the user, or a GPU's own memory: train.py refuses a run that does not fit
    notes: list[str] = field(default_factory=list)
    tflops: float | None = None

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def item(self, name: str) -> Item:
        return next(i for i in self.items if i.name == name)

    def table(self) -> str:
        width = max(len(i.name) for i in [*self.items, *self.host]) + 2
        lines = [*self.title, "", f"{'per device':<{width}}{'bytes':>12}  {'kind':<9} how"]
        lines += [f"{i.name:<{width}}{format_bytes(i.bytes):>12}  {i.kind:<9} {i.formula}" for i in self.items]
        lines.append(f"{'total':<{width}}{format_bytes(self.total):>12}")
        if self.device_memory is None:
            lines.append(f"{'device memory':<{width}}{'unknown':>12}  {self.memory_source}")
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            spare = self.device_memory - self.total
            lines.append(f"{'device memory':<{width}}{format_bytes(self.device_memory):>12}  {self.memory_source}: "
                         f"{verdict} ({'spare' if spare >= 0 else 'short by'} {format_bytes(abs(spare))})")
        if self.host:
            lines += ["", f"{'host (CPU RAM)':<{width}}"]
            lines += [f"{i.name:<{width}}{format_bytes(i.bytes):>12}  {i.kind:<9} {i.formula}" for i in self.host]
        lines += ["", f"{'FLOPs':<{width}}{'per step':>12}"]
        lines += [f"{name:<{width}}{format_flops(value):>12}  {how}" for name, value, how in self.flops]
        per_step = sum(v for n, v, _ in self.flops if not n.startswith("Hungarian"))
        total = per_step * self.steps * self.blocks
        where = f" x {self.blocks} blocks" if self.blocks > 1 else ""
        line = f"{'whole run':<{width}}{format_flops(total):>12}  {self.steps} steps{where} per device"
        if self.tflops:
            line += f"; {total / (self.tflops * 1e12) / 3600:.2f} h at {self.tflops:g} TFLOP/s sustained"
        lines.append(line)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _world_size(cfg: DictConfig) -> int:
    declared = OmegaConf.select(cfg, "plan.world_size")
    if declared:
        return int(declared)
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        count = len(devices)
    elif isinstance(devices, int):
        count = devices if devices > 0 else (torch.cuda.device_count() or 1)
    else:
        count = (torch.cuda.device_count() or 1) if accelerator_kind(cfg) == "cuda" else 1
    return max(count, 1) * int(cfg.trainer.get("num_nodes", 1) or 1)


def _host_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _device_memory(cfg: DictConfig, accelerator: str) -> tuple[int | None, str, bool]:
    declared = parse_bytes(OmegaConf.select(cfg, "plan.device_memory"))
    if declared is not None:
        return declared, "declared (plan.device_memory)", True
    if accelerator == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), f"GPU 0 ({props.name})", True
    if accelerator == "cpu":
        ram = _host_ram()
        if ram is not None:
            return ram, "this host's RAM (not enforced; declare plan.device_memory)", False
    return None, f"unknown for accelerator {accelerator!r}: declare plan.device_memory=...", False


def _grad_dtype(method: LearnedPermutation, accelerator: str) -> torch.dtype:
    if method.grad_precision == "auto":
        return torch.bfloat16 if native_bf16_matmul("cpu" if accelerator == "cpu" else accelerator) else torch.float32
    return torch.bfloat16 if method.grad_precision == "bfloat16" else torch.float32


def _steps(cfg: DictConfig, world: int, strategy: str, mode: str = "e2e") -> int:
    """Optimiser steps of one device: end to end, the run's; block-local, one block's (``learning.block_steps``)."""
    if mode == "block":
        return block_steps(cfg)
    return e2e_steps(cfg, world if strategy != "single" else 1)


def _precision_note(precision: str) -> str | None:
    if "mixed" in precision:
        return (f"trainer.precision={precision}: activations were traced in the weights' dtype; autocast keeps part "
                "of them in 16 bits (the figure is an upper bound, real ones are lower by up to half), and adds a "
                "16-bit copy of every masked weight it multiplies (row 'autocast weight copies')")
    return None


def plan_run(cfg: DictConfig) -> Plan:
    """The plan of the run ``cfg`` describes (the same composed config as ``train.py``); loads no weights."""
    from hydra.utils import instantiate

    mode = str(OmegaConf.select(cfg, "learning.mode", default="e2e"))
    if mode not in MODES:
        raise ConfigError(f"learning.mode={mode!r} is invalid; choose e2e (end to end) or block (block-local)")
    method = build_method(cfg)
    pattern = NMPattern(int(cfg.sparsity.n), int(cfg.sparsity.m))
    model, source = meta_model(cfg.model)
    if not isinstance(method, LearnedPermutation):
        spec = get_spec(model)
    else:  # prune.skip_indivisible: the plan leaves out the groups the run will leave dense
        from permsparse.run import skip_indivisible_if

        skip_indivisible_if(cfg, model, pattern, method.foldable,
                            lambda d_in, name: method.blocks_for(d_in, pattern.m, name))
        spec = get_spec(model)
    binding = spec.groups(model)
    accelerator, strategy, world = accelerator_kind(cfg), strategy_kind(cfg), _world_size(cfg)
    memory, memory_source, enforced = _device_memory(cfg, accelerator)
    precision = str(cfg.trainer.get("precision", "32-true"))
    batch = int(cfg.learning.batch_size)
    seq_len = (cfg.learning.get("seq_len") or cfg.dataset.datamodule.get("seq_len")) \
        if cfg.model.task == "causal_lm" else None
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}
                  .values())
    title = [f"permsparse plan: model={cfg.model.name} ({type(model).__name__}; {source})",
             f"  learning.mode={mode}, trainer: {accelerator} x {world} ({strategy}), precision {precision}, "
             f"sparsity {pattern}, pruner={cfg.pruner.name}, perm={cfg.perm.name}"]
    if not isinstance(method, LearnedPermutation):
        items = [Item("frozen weights", weights, "exact", "every parameter and buffer (tied ones once)")]
        return Plan(title, items, [], [], 0, 1, memory, memory_source, enforced,
                    [f"perm={cfg.perm.name} learns nothing: the run holds the model and calibration only"])
    check_model_divisible(model, binding, pattern, foldable=method.foldable,
                          check=lambda d_in, name: method.blocks_for(d_in, pattern.m, name))
    groups = _group_plans(model, binding, method, pattern)
    linears = [lin for g in groups for lin in g.linears]
    blocks = spec.blocks(model)
    n_blocks = max(len(blocks), 1)
    pruner = instantiate(cfg.pruner.method)
    grad_dtype = _grad_dtype(method, accelerator)

    module = instantiate(cfg.model.module)(model=model, optimizer=None, scheduler=None, alpha=cfg.perm.alpha,
                                           distill=cfg.perm.distill, task_weight=cfg.perm.task_weight)
    module.permutations = _NoPermutations()
    example = _example_batch(model, str(cfg.model.task), batch, int(seq_len or 0))
    trace = trace_step(module, model, blocks, [lin.name for lin in linears], example)

    def block_share(select: Callable[[Any], bool]) -> tuple[list[GroupPlan], list[LinearPlan]]:
        chosen = [g for g in groups if select(g)]
        return chosen, [lin for g in chosen for lin in g.linears]

    if mode == "block":  # the largest block decides the device's peak
        by_block = {b: sum(lin.numel * lin.itemsize for lin in lins)
                    for b, lins in _by_block(linears).items()}
        worst = max(by_block, key=lambda b: (by_block[b], -b)) if by_block else 0
        dev_groups, dev_linears = block_share(lambda g: g.block == worst)
        block_params = sum(p.numel() * p.element_size() for p in blocks[worst].parameters()) if blocks else 0
        block_params += sum(b.numel() * b.element_size() for b in blocks[worst].buffers()) if blocks else 0
    else:
        worst, dev_groups, dev_linears, block_params = -1, groups, linears, weights

    bound_numel = sum(lin.numel for lin in dev_linears)
    bound_bytes = sum(lin.numel * lin.itemsize for lin in dev_linears)
    elements = sum(g.cost_elements for g in dev_groups)
    costs = elements * F32 + sum(g.buffer_bytes for g in dev_groups)
    n_params = len(dev_groups)
    soft = method.mode == "soft"
    # trainer=fsdp (PermutationFSDPStrategy) shards parameters only: the frozen weights and the costs, and so the
    # optimiser states. The costs are whole during a step (the root unit, gathered from the refresh to the end of
    # the backward), and so is their gradient until the reduce-scatter; scores, masks and workspaces are plain
    # tensors, whole on every rank.
    shard = world if strategy == "fsdp" else 1
    what = "one block" if mode == "block" else "all"
    items = [
        Item("frozen weights", block_params // shard, "exact",
             (f"block {worst}'s parameters and buffers" if mode == "block" else
              "every parameter and buffer (tied ones once)") + (f", / {world} (FSDP shards)" if shard > 1 else "")),
        Item("pruner scores", bound_numel * F32, "exact",
             f"4 B x {bound_numel:,} bound weights ({what}; float32, transposed)"),
        Item("masks", bound_numel if soft else bound_bytes, "exact",
             "1 B (bool, soft mode) x bound weights" if soft else "weight dtype x bound weights (0/1, original order)"),
        Item("costs + Sinkhorn potentials", costs, "exact",
             f"4 B x {elements:,} cost entries (sum of (G/tie) g^2 over {len(dev_groups)} groups) + 4 B x 2 (G/tie) g"
             + ("; whole during a step (FSDP's root unit, gathered)" if shard > 1 else "")),
        Item("cost gradients", elements * F32, "exact", "= the cost parameters"
             + (" (FSDP: whole until the reduce-scatter)" if shard > 1 else "")),
        Item("optimiser states (AdamW)", (2 * elements * F32 + F32 * n_params) // shard, "exact",
             "exp_avg + exp_avg_sq: 2 x costs, + a float32 step per cost tensor"
             + (f", / {world} (FSDP shards)" if shard > 1 else "")),
        Item("gradient workspaces", 4 * bound_numel if grad_dtype == torch.bfloat16 and not soft else 0,
             "exact", f"grad_precision={method.grad_precision} -> {str(grad_dtype).removeprefix('torch.')}: "
             + ("2 B x 2 x bound weights ([W | G] per linear)" if grad_dtype == torch.bfloat16 else "none")),
    ]
    iters = method.sinkhorn_iters
    sinkhorn = (2 * iters + 1) * elements * F32 + sum(g.free for g in dev_groups) * F32
    sinkhorn += sum((g.blocks - g.free) * g.g * g.g * F32 for g in dev_groups)  # tied groups' repeated matrices
    if method.kept_weight > 0:
        sinkhorn += sum(g.cost_elements * g.tie * F32 * len(g.linears) for g in dev_groups)
    items.append(Item("Sinkhorn / permutation intermediates", sinkhorn, "exact",
                      f"(2 x sinkhorn_iters={iters} + 1) x costs kept for backward (first step; later "
                      f"{2 * (method.warm_iters or iters) + 1}x)"))
    local = sum(8 * lin.d_in for lin in dev_linears)  # the (G, g) int64 local permutation each linear saves
    local += sum(8 * g.d_in for g in dev_groups if g.framed)  # a framed group's base permutation, one per group
    if method.mask_grad:  # the soft top-N's backward keeps the group's whole permutation (shared by its linears)
        local += sum(8 * g.d_in for g in dev_groups)
    items.append(Item("masked weights kept for backward", bound_bytes * (2 if soft else 1) + local,
                      "estimate" if soft else "exact",
                      "weight dtype x bound weights (W * M per linear, saved by autograd) + 8 B x d_in local indices"
                      " (+ 8 B x d_in per group for a perm.method.base frame, and again with mask_grad)"
                      + ("; x2 in soft mode (W P and (W P) * M)" if soft else "")))
    if "mixed" in precision:
        lowp = 2 * (bound_numel + (0 if mode == "block" else _other_linear_numel(model, linears)))
        items.append(Item("autocast weight copies", lowp, "estimate",
                          "2 B x masked and frozen linear weights autocast casts and autograd saves"))
    act_bytes = trace.saved_bytes if mode == "e2e" else trace.saved_by_block.get(worst, 0)
    formula = (f"tensors autograd saves in one traced step, batch {batch} x {seq_len or '-'} "
               f"({n_blocks} blocks + embeddings, head, loss)" if mode == "e2e" else
               f"block {worst}'s saved tensors in one traced step, batch {batch} x {seq_len or '-'}, + the batch's "
               "dense target and the student output the loss keeps")
    if mode == "block":
        act_bytes += 2 * trace.block_output_bytes.get(worst, 0)  # the block-local loss keeps student and target
    else:
        act_bytes += trace.output_bytes
        formula += ", + the task output"
    items.append(Item("activations (one step)", act_bytes, "estimate", formula))
    if mode == "e2e":
        items.append(Item("distillation teacher capture", trace.teacher_bytes if cfg.perm.alpha > 0 else 0,
                          "estimate", "the dense pass's block outputs and task output, alive until the loss"
                          if cfg.perm.alpha > 0 else "perm.alpha=0: no teacher pass"))
    largest = max(dev_linears, key=lambda lin: lin.numel, default=None)
    transient = elements * F32
    if largest is not None:
        transient += 2 * largest.numel * F32 + (4 * largest.numel if grad_dtype == torch.bfloat16 else 0)
    items.append(Item("backward transients", transient, "estimate",
                      "P-gradients of all groups (= costs) + the largest linear's weight gradient and G * M"
                      + (" + its workspace right-hand side" if grad_dtype == torch.bfloat16 else "")))
    if strategy == "ddp" and world > 1:
        items.append(Item("DDP gradient buckets", elements * F32, "exact", "a copy of the cost gradients"))
    if strategy == "fsdp" and world > 1:
        in_blocks = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
        root = weights - sum(in_blocks) - sum(b.numel() * b.element_size() for blk in blocks for b in blk.buffers())
        unit = root + max(in_blocks, default=0) + elements * F32 // world
        items.append(Item("FSDP gathered units", unit, "estimate",
                          "the root unit's frozen parameters (embeddings, norm, head; gathered for the whole step), "
                          "the largest block's parameters (gathered while it runs) and the costs' own 1/world shard"))

    stream = mode == "block" and bool(OmegaConf.select(cfg, "learning.stream", default=False))
    in_blocks = sum(t.numel() * t.element_size() for b in blocks for t in [*b.parameters(), *b.buffers()])
    host = _host_items(linears, weights, pruner, mode, stream, weights - in_blocks)
    if mode == "block":
        out = trace.block_output_bytes.get(worst, 0) // max(batch, 1)
        samples = int(cfg.learning.train_samples) + int(cfg.learning.val_samples)
        host.append(Item("block input cache", 2 * samples * out, "estimate",
                         f"the current block's inputs (outputs of the pruned blocks before it) + its dense targets, "
                         f"{samples} training and validation windows x {format_bytes(out)} each"))
        if stream:
            host += _stream_caches(cfg, pruner, out // max(int(seq_len or 1), 1))
    flops = _flops(trace, method, dev_groups, dev_linears, mode, worst, n_blocks, batch * int(seq_len or 1), cfg)
    notes = []
    if mode == "block":
        where = ("the caches and the dense copy stay on the host, the other blocks in the checkpoint's shards "
                 "(learning.stream=true)" if stream else
                 "the cache, the other blocks and the dense copies stay on the host")
        notes.append("learning.mode=block: one block's weights, scores, masks, costs, optimiser states and activations "
                     f"on the device at once (the largest block, {worst}, shown), one batch of its cached inputs and "
                     f"targets moved there per step; {where}"
                     + ("; learning.finetune_e2e then needs the e2e plan (learning.mode=e2e)"
                        if cfg.learning.get("finetune_e2e") else ""))
    if strategy == "fsdp":
        notes.append("trainer=fsdp shards the parameters (frozen weights, costs) and the optimiser states / world "
                     "size; one block unit and the root unit (embeddings, head, costs) are gathered at a time; scores, "
                     "masks, workspaces, Sinkhorn intermediates, masked weights and activations stay whole per device")
    if note := _precision_note(precision):
        notes.append(note)
    if memory is not None and sum(i.bytes for i in items) > memory:
        notes += _hints(items)
    steps = _steps(cfg, world, strategy, mode)
    title.append(f"  {len(groups)} binding groups, {len(linears)} bound linears, {n_blocks} blocks; batch {batch} x "
                 f"{seq_len or '-'} per device; groups={method.groups if method.block_size is None else '-'}, "
                 f"block_size={method.block_size}, mode={method.mode}, weights "
                 f"{str(linears[0].itemsize * 8) + '-bit' if linears else '-'}")
    tflops = OmegaConf.select(cfg, "plan.tflops")
    return Plan(title, items, host, flops, steps, n_blocks if mode == "block" else 1, memory, memory_source,
                enforced, notes, float(tflops) if tflops else None)


def _by_block(linears: list[LinearPlan]) -> dict[int, list[LinearPlan]]:
    out: dict[int, list[LinearPlan]] = {}
    for lin in linears:
        out.setdefault(lin.block, []).append(lin)
    return out


def _other_linear_numel(model: nn.Module, linears: list[LinearPlan]) -> int:
    bound = {lin.name for lin in linears}
    return sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in bound)


def _host_items(linears: list[LinearPlan], weights: int, pruner: Any, mode: str, stream: bool = False,
                outside_blocks: int = 0) -> list[Item]:
    hessian = getattr(pruner, "needs_hessian", False)

    def stats_bytes(lins: list[LinearPlan]) -> int:
        return sum(lin.d_in * 8 + (lin.d_in * lin.d_in * 8 if hessian else 0) for lin in lins)

    how = "X^T X per linear (SparseGPT), float64" if hessian else "sum of x^2 per input channel, float64"
    bound = sum(lin.numel for lin in linears)
    if stream:  # learning.stream=true: the blocks stay in the checkpoint; statistics live one block at a time
        largest_stats = max((stats_bytes(lins) for lins in _by_block(linears).values()), default=0)
        out = [Item("modules outside the blocks", outside_blocks, "exact",
                    "embeddings, final norm, head (tied ones once) in model.load.dtype; every block stays in the "
                    "checkpoint's shards until it is read"),
               Item("calibration statistics", largest_stats, "exact", how + ", the current block's only")]
    else:
        out = [Item("model as loaded", weights, "exact", "the checkpoint in model.load.dtype"
                    + ("; block mode keeps it here and moves one block at a time to the device"
                       if mode == "block" else "")),
               Item("calibration statistics", stats_bytes(linears), "exact", how)]
    if mode == "e2e":
        out.append(Item("scores + masks while building", bound * (F32 + linears[0].itemsize) if linears else 0,
                        "exact", "built on the host before Lightning moves them to the device"))
    else:
        by_block = _by_block(linears)
        largest = max((sum(lin.numel * lin.itemsize for lin in lins) for lins in by_block.values()), default=0)
        out.append(Item("dense copy of the current block", largest, "exact",
                        "its bound weights, copied before it is pruned and restored once its output is cached"))
    return out


def _datamodule_settings(datamodule: Any) -> dict[str, Any]:
    """A data module config's keys over its class's own defaults: what the data module will be built with."""
    import inspect

    from hydra.utils import get_object

    params = inspect.signature(get_object(str(datamodule["_target_"]))).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **OmegaConf.to_container(datamodule, resolve=True)}


def _eval_window_count(settings: Mapping[str, Any]) -> int | None:
    """How many windows a text data module built with ``settings`` (:func:`_datamodule_settings`) evaluates, or
    ``None`` for every window of its split (``eval_windows: null``)."""
    if "held_out" in settings:  # the mixture: every held-out domain, then every source's tail
        return (len(settings["held_out"]) * int(settings["held_out_windows"])
                + len(settings["sources"]) * int(settings["eval_windows"] or 0))
    if settings.get("eval_windows") is None:
        return None
    second = int(settings.get("second_domain_windows") or 0) if settings.get("second_domain") else 0
    return int(settings["eval_windows"]) + second


def _stream_caches(cfg: DictConfig, pruner: Any, per_token: int) -> list[Item]:
    """``learning.stream=true``'s host caches besides the learning windows: the calibration windows' and every
    evaluated phase's hidden states, advanced block by block (``per_token``: bytes of one token's hidden state)."""
    settings = _datamodule_settings(cfg.dataset.datamodule)
    seq_len = int(settings.get("seq_len") or 0)
    pruned = 1 + bool(cfg.eval.get("identity_baseline", True))
    phases = pruned + bool(cfg.eval.get("dense_baseline", True))
    out = []
    if getattr(pruner, "needs_stats", False) or getattr(pruner, "needs_hessian", False):
        copies = pruned if cfg.calibration.get("sequential") else 1
        samples = int(cfg.calibration.samples)
        out.append(Item("calibration windows' hidden states", copies * samples * seq_len * per_token, "estimate",
                        f"{samples} windows x {seq_len} tokens x {format_bytes(per_token)}, x {copies} "
                        "(one copy, or one per pruned phase with calibration.sequential)"))
    windows = _eval_window_count(settings)
    if windows is None:
        out.append(Item("evaluation hidden states", 0, "unknown",
                        f"dataset={cfg.dataset.name} evaluates every window of its split (eval_windows: null), "
                        f"{format_bytes(seq_len * per_token)} per window and phase; not counted before the data "
                        "is read"))
    else:
        out.append(Item("evaluation hidden states", phases * windows * seq_len * per_token, "estimate",
                        f"{windows} windows x {seq_len} tokens x {format_bytes(per_token)}, one copy per evaluated "
                        f"phase ({phases}: dense, pruned, identity as eval.* asks)"))
    return out


def _flops(trace: Trace, method: LearnedPermutation, groups: list[GroupPlan], linears: list[LinearPlan], mode: str,
           block: int, n_blocks: int, tokens: int, cfg: DictConfig) -> list[tuple[str, float, str]]:
    grad = sum(4.0 * lin.d_in * lin.g * lin.d_out for lin in linears)
    if method.mask_grad:
        grad *= 1.5
    iters = method.warm_iters or method.sinkhorn_iters
    elements = sum(g.cost_elements for g in groups)
    hungarian = float(sum(g.free * g.g ** 3 for g in groups))
    if mode == "e2e":
        model_fwd, model_bwd = trace.forward_flops, trace.backward_flops
        how = "torch.utils.flop_counter on the meta step (teacher + student; attention without the causal skip)"
    else:
        linear = sum(2.0 * tokens * lin.numel for lin in linears)
        attention = trace.attention_flops_by_block.get(block, 0.0)
        model_fwd = linear + attention  # the student; the dense targets are computed once per window and block
        model_bwd = 2 * linear + 2 * attention
        how = f"block {block}: 2 x tokens x its weights + attention, the student (targets cached once per window)"
    return [("model forward", model_fwd, how),
            ("model backward", model_bwd, "gradients of the inputs and of the masked weights"),
            ("permutation gradient", grad, "4 x d_in x g x d_out per bound linear (the P-gradient matmuls)"
             + (", x1.5 with mask_grad" if method.mask_grad else "")),
            ("Sinkhorn", 10.0 * iters * elements, f"about 10 FLOP per cost entry and iteration ({iters} warm)"),
            ("Hungarian (host)", hungarian, "about g^3 operations per free block, on the CPU (not in the sum)")]


def _hints(items: list[Item]) -> list[str]:
    top = sorted(items, key=lambda i: -i.bytes)[:3]
    out = ["largest rows: " + ", ".join(f"{i.name} {format_bytes(i.bytes)}" for i in top)]
    advice = {
        "Sinkhorn / permutation intermediates": "fewer perm.method.sinkhorn_iters / warm_iters, or a larger "
        "perm.method.groups (costs shrink as d_in^2 / G), or learning.mode=block",
        "costs + Sinkhorn potentials": "a larger perm.method.groups or a perm.method.block_size (costs d_in^2 / G)",
        "optimiser states (AdamW)": "a larger perm.method.groups (2 x costs)",
        "frozen weights": "model.load.dtype=bfloat16 (half the weights and masks), learning.mode=block or trainer=fsdp",
        "masked weights kept for backward": "model.load.dtype=bfloat16 or learning.mode=block (one block's copies)",
        "pruner scores": "learning.mode=block (one block's scores)",
        "masks": "model.load.dtype=bfloat16 (masks take the weights' dtype) or learning.mode=block",
        "gradient workspaces": "perm.method.grad_precision=float32 (no workspace)",
        "activations (one step)": "a smaller learning.batch_size or learning.seq_len",
    }
    out += [f"to shrink '{i.name}': {advice[i.name]}" for i in top if i.name in advice]
    return out


# ------------------------------------------------------------------------------------------ entry points


def check_plan(cfg: DictConfig) -> Plan | None:
    """``train.py``'s check before it loads anything: raise :class:`ConfigError` with the table when the run cannot
    fit a declared ``plan.device_memory`` (or a GPU's own memory); otherwise log the plan at INFO. For a learned run
    only: :func:`permsparse.run.train` calls it when its built method is learned (heuristic methods hold the model
    and calibration only). ``plan.check=false`` skips it. A planner failure other than a config error is logged and
    never stops the run."""
    if not OmegaConf.select(cfg, "plan.check", default=True):
        return None
    try:
        plan = plan_run(cfg)
    except ConfigError:
        raise
    except Exception as err:  # the planner is advice: a model it cannot trace still trains
        log.warning("memory planner skipped (%s: %s)", type(err).__name__, err)
        return None
    if plan.enforced and plan.fits is False:
        raise ConfigError("this run does not fit the device memory (python -m permsparse.plan prints the same table; "
                          "plan.check=false skips the check):\n" + plan.table())
    log.info("memory plan:\n%s", plan.table())
    return plan


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as ``train.py`` composes it (``PERMSPARSE_CONF``: another
    config folder)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(_config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """``python -m permsparse.plan <hydra overrides>``; ``device_memory=`` is short for ``plan.device_memory=``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    args = [f"plan.{a}" if a.split("=", 1)[0] in ("device_memory", "world_size", "tflops") else a for a in args]
    logging.basicConfig(level=logging.WARNING)
    try:
        plan = plan_run(compose_config(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.table())
    return 0 if plan.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
