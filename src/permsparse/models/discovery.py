"""Binding discovery: the binding groups of a model that no explicit spec describes, from one forward pass.

Layers that read the same tensor must share one input permutation (docs/method.md §3). Discovery finds them
without tracing the graph and without reading module names:

1. **The blocks.** The model's *block list* is the ``nn.ModuleList`` / ``nn.Sequential`` whose children are all
   of one class, each holding at least one ``nn.Linear`` below it, and which holds the most linears of all such
   containers (ties: the one with more children, then the outermost). In a decoder this is ``layers`` / ``h``, in
   a timm ViT ``blocks``; the expert list of a mixture-of-experts layer loses to the decoder layers around it.
   A linear's block is the child of that list it belongs to, found by module identity.
2. **Who reads what.** A forward pre-hook on every ``nn.Linear`` (subclasses included) records the tensor it is
   called on, once :func:`discover_spec` runs ``model`` on an example input. Two calls read the same input when
   their tensors are the same view of the same storage: equal ``untyped_storage().data_ptr()``, storage offset,
   shape, stride, dtype and version counter (the version tells a tensor apart from itself after an in-place
   write). Every recorded tensor is kept alive until the pass ends, so no storage is freed and reused by another
   tensor in between. Linears that read one tensor (in any of their calls) form one group (union-find).
3. **What is targeted.** Only linears inside a block are bound. Every other linear (the output head ``lm_head``
   or a classifier ``head``, a pooler, a projector, a linear patch embedding) stays dense: the rule is structural,
   "outside the repeated blocks", and the head is the linear that reads the final normalised stream after them.
   A group's block is the block of its first linear in forward order; groups are listed in forward order. (A
   tensor read in two blocks, or a linear shared across blocks, would make one group span blocks: it is then
   listed under the first, which block-by-block calibration does not expect; no tested family does this.)

Each group's producer is :class:`~permsparse.models.binding.Discovered` (an ``Opaque`` producer): discovery knows
who reads a tensor, not how it was made, so export applies these permutations with runtime gathers and says so
per group. Discovery refuses, with a :class:`~permsparse.errors.ConfigError` naming the model class, the layer
and the missing piece, a block that holds a transformers ``Conv1D`` (weights stored transposed: GPT-2 needs an
explicit spec), a block that holds weights stacked in a 3D tensor (transformers' mixture-of-experts layers: the
experts would silently stay dense) and a linear inside a block whose forward the pass never called (an expert no
token was routed to, or a weight the model uses through ``F.linear`` directly, as timm's EVA does for ``qkv`` with
q/v biases).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from permsparse.errors import ConfigError
from permsparse.models.binding import BindingGroup, BindingSpec, Discovered

__all__ = ["DiscoveredSpec", "discover_spec", "default_example", "timm_input_size", "find_block_list", "cached_spec",
           "binding_differences", "DISCOVERED_FAMILY", "HF_CAUSAL_LM_FAMILY", "TIMM_FAMILY"]

#: ``BindingSpec.family`` of a discovered spec, by what export knows how to feed, save and rebuild
HF_CAUSAL_LM_FAMILY = "hf_causal_lm"
TIMM_FAMILY = "timm"
DISCOVERED_FAMILY = "discovered"

EXAMPLE_TOKENS = 16  # length of the token-id example built for Hugging Face models

_CACHE: weakref.WeakKeyDictionary[nn.Module, DiscoveredSpec] = weakref.WeakKeyDictionary()


class DiscoveredSpec(BindingSpec):
    """A :class:`BindingSpec` found by :func:`discover_spec`, for one model (its groups are data, not code).

    ``family`` says which export family can feed, save and rebuild the model (``"hf_causal_lm"``, ``"timm"``,
    or ``"discovered"`` where none can). It lists no residual-stream parameters, so a shared residual-stream
    permutation is gathered, not folded. ``untargeted`` names the linears that the pass reached outside the
    blocks (the head): they stay dense.
    """

    def __init__(self, model_class: str, block_list: str, block_names: list[str], groups: list[BindingGroup],
                 untargeted: list[str], family: str = DISCOVERED_FAMILY) -> None:
        self.model_class = model_class
        self.block_list = block_list
        self._block_names = list(block_names)
        self._groups = list(groups)
        self.untargeted = list(untargeted)
        self.family = family

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False  # never registered: get_spec builds one per model, by discovery

    def groups(self, model: nn.Module) -> list[BindingGroup]:
        return [replace(g, linears=list(g.linears)) for g in self._groups]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(p) for p in self.block_prefixes(model)]

    def block_prefixes(self, model: nn.Module) -> list[str]:
        return [f"{self.block_list}.{n}" if self.block_list else n for n in self._block_names]

    def residual_params(self, model: nn.Module) -> list[tuple[str, int]]:
        raise NotImplementedError(
            f"binding of {self.model_class} was discovered (no explicit spec): its residual-stream parameters are "
            "unknown, so a shared residual-stream permutation cannot be folded"
        )

    def __repr__(self) -> str:
        return (f"DiscoveredSpec({self.model_class}, family={self.family!r}, {len(self._block_names)} blocks in "
                f"{self.block_list!r}, {len(self._groups)} groups)")


# ------------------------------------------------------------------------------------------------- blocks


def _conv1d() -> tuple[type, ...]:
    """transformers' ``Conv1D`` (GPT-2): a linear layer with a transposed weight, refused by type."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


def _linears_below(module: nn.Module) -> int:
    """Linear layers below ``module``: ``nn.Linear`` and ``Conv1D`` (so that a GPT-2 block list is found, then
    refused with a reason)."""
    kinds = (nn.Linear, *_conv1d())
    return sum(isinstance(m, kinds) for m in module.modules())


def find_block_list(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, container)`` of the model's block list (see the module docstring); a ``ConfigError`` if none."""
    best: tuple[tuple[int, int], str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        children = list(module.children())
        if len({type(c) for c in children}) != 1 or isinstance(children[0], (nn.Linear, *_conv1d())):
            continue
        counts = [_linears_below(c) for c in children]
        if min(counts) == 0:
            continue
        score = (sum(counts), len(children))
        if best is None or score > best[0]:  # strict: on a full tie the outer container (seen first) stays
            best = (score, name, module)
    if best is None:
        raise ConfigError(
            f"binding discovery: {type(model).__name__} has no block list (an nn.ModuleList or nn.Sequential of "
            "blocks of one class, each holding nn.Linear layers); give it an explicit BindingSpec"
        )
    return best[1], best[2]


# --------------------------------------------------------------------------------------------- examples


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    return device, dtype


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _is_hf_causal_lm(model: nn.Module) -> bool:
    """True if ``AutoModelForCausalLM`` rebuilds exactly this class from the model's config (what export needs)."""
    if not _is_hf(model):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(model.config)] is type(model)
    except (KeyError, ValueError):
        return False


def _timm_cfg(model: nn.Module) -> Mapping[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return cfg if isinstance(cfg, Mapping) else None


def timm_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """``(channels, height, width)`` a timm model accepts: ``pretrained_cfg["input_size"]``, corrected by a patch
    embedding's own ``img_size`` / ``proj.in_channels`` (timm keeps the registry's size in ``pretrained_cfg`` when a
    model is created with another ``img_size`` or ``in_chans``); ``None`` for a model without ``pretrained_cfg``."""
    cfg = _timm_cfg(model)
    if cfg is None or not cfg.get("input_size"):
        return None
    size = [int(s) for s in cfg["input_size"]]
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(s, int) for s in img_size):
        size[1:] = img_size
    channels = getattr(getattr(embed, "proj", None), "in_channels", None)
    if isinstance(channels, int):
        size[0] = channels
    return tuple(size)


def default_example(model: nn.Module) -> Any:
    """An input discovery can run ``model`` on, or ``None`` where none can be built.

    Hugging Face models reading ``input_ids``: ``{"input_ids": (1, 16)}`` seeded random token ids below
    ``config.vocab_size`` (random, not zeros, so that a router sends tokens to many experts); timm models: a
    zero image ``(1, *pretrained_cfg["input_size"])`` (:func:`timm_input_size`).
    """
    device, dtype = _device_and_dtype(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if _is_hf(model) and getattr(model, "main_input_name", None) == "input_ids" and vocab:
        ids = torch.randint(0, int(vocab), (1, EXAMPLE_TOKENS), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids.to(device)}
    size = timm_input_size(model)
    return None if size is None else torch.zeros((1, *size), device=device, dtype=dtype)


def _family(model: nn.Module) -> str:
    if _is_hf_causal_lm(model):
        return HF_CAUSAL_LM_FAMILY
    if (_timm_cfg(model) or {}).get("architecture"):
        return TIMM_FAMILY
    return DISCOVERED_FAMILY


# -------------------------------------------------------------------------------------------- discovery


@dataclass
class _Call:
    index: int
    name: str
    key: tuple


def _tensor_key(x: Tensor) -> tuple:
    """Same key <=> same values: the same view of the same storage, not written in place in between.

    A meta-device tensor (a model built from its config alone, as the planner does) has no storage address: the
    root of its view chain (``_base``), which the pass keeps alive, stands for the storage."""
    if x.device.type == "meta":
        root = x._base if x._base is not None else x
        return ("meta", id(root), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype, x._version)
    try:
        ptr = x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without a plain storage: identity only
        return ("id", id(x))
    return (ptr, x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype, x._version)


def _run(model: nn.Module, example: Any) -> None:
    if isinstance(example, Mapping):
        model(**example)
    elif isinstance(example, tuple):
        model(*example)
    else:
        model(example)


def _refuse_conv1d(model: nn.Module, container: nn.Module, block_list: str) -> None:
    kinds = _conv1d()
    found = [f"{block_list}.{n}" for n, m in container.named_modules() if kinds and isinstance(m, kinds)]
    if found:
        raise ConfigError(
            f"binding discovery: {type(model).__name__} has transformers Conv1D layers ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}), which store their weight transposed, (d_in, d_out); discovery "
            f"binds nn.Linear only. Missing piece: an explicit BindingSpec for {type(model).__name__} that handles "
            "Conv1D (the GPT-2 family)"
        )


def _refuse_stacked_weights(model: nn.Module, container: nn.Module, block_list: str) -> None:
    """Refuse weights stored as one stacked 3D tensor inside a block (transformers 5's mixture-of-experts layers keep
    every expert's matrix in ``experts.gate_up_proj`` / ``experts.down_proj`` of shape ``(experts, d_out, d_in)``
    and apply them with ``F.linear`` / grouped matmuls): no hook sees them, so discovery would silently leave the
    experts dense. ``nn.Conv1d`` kernels (also 3D) are not weights of this kind."""
    found = [f"{block_list}.{module_name}.{name}" if module_name else f"{block_list}.{name}"
             for module_name, module in container.named_modules() if not isinstance(module, nn.Conv1d)
             for name, param in module.named_parameters(recurse=False) if param.dim() == 3]
    if found:
        raise ConfigError(
            f"binding discovery: {type(model).__name__} keeps weights as stacked 3D tensors inside its blocks "
            f"({', '.join(found[:2])}{', ...' if len(found) > 2 else ''}; e.g. mixture-of-experts weights of shape "
            "(experts, d_out, d_in)), which no nn.Linear hook sees and which pruning, calibration and export do not "
            "handle. Missing piece: per-expert binding groups and pruning of stacked expert weights (an explicit "
            f"BindingSpec for {type(model).__name__} with that support){_unfuse_hint(model)}"
        )


def _unfuse_hint(model: nn.Module) -> str:
    from permsparse.models.qwen2_moe import refusal_hint

    return refusal_hint(model)


def _group_name(linears: list[str]) -> str:
    """``"model.layers.0.self_attn.q_proj+k_proj+v_proj"``: the common prefix, then each linear's rest."""
    if len(linears) == 1:
        return linears[0]
    parts = [n.split(".") for n in linears]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    rest = "+".join(".".join(p[common:]) for p in parts)
    return ".".join([*parts[0][:common], rest]) if common else rest


@torch.no_grad()
def discover_spec(model: nn.Module, example: Any = None) -> DiscoveredSpec:
    """Discover ``model``'s binding groups from one forward pass on ``example`` (see the module docstring).

    ``example``: a tensor (one positional argument), a tuple (positional arguments) or a mapping (keyword
    arguments); ``None`` builds :func:`default_example`. The model's outputs are discarded, its train/eval mode
    restored; parameters are not touched.
    """
    cls = type(model).__name__
    if example is None:
        example = default_example(model)
        if example is None:
            raise ConfigError(f"binding discovery: cannot build an example input for {cls} (neither a Hugging Face "
                              "model reading input_ids nor a timm model with pretrained_cfg['input_size']); "
                              "pass one: get_spec(model, example=...) or discover_spec(model, example)")
    block_list, container = find_block_list(model)
    _refuse_conv1d(model, container, block_list)
    _refuse_stacked_weights(model, container, block_list)
    block_names = [n for n, _ in container.named_children()]
    block_of: dict[int, int] = {}
    for index, block in enumerate(container.children()):
        for module in block.modules():
            if isinstance(module, nn.Linear):
                block_of.setdefault(id(module), index)
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    calls: list[_Call] = []
    keep: list[Tensor] = []  # every recorded input stays alive: no storage is reused while the pass runs

    def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor):
            keep.append(x)
            calls.append(_Call(len(calls), names[id(module)], _tensor_key(x)))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True)
               for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        _run(model, example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
        keep.clear()

    by_name = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    in_blocks = [n for n, m in by_name.items() if id(m) in block_of]
    reached = {c.name for c in calls}
    unreached = [n for n in in_blocks if n not in reached]
    if unreached:
        raise ConfigError(
            f"binding discovery: the forward pass on the example never called {len(unreached)} nn.Linear(s) inside "
            f"the blocks of {cls} ({', '.join(unreached[:3])}{', ...' if len(unreached) > 3 else ''}), so what they "
            "read is unknown: either the example does not reach them (e.g. an expert no token was routed to) or the "
            "model uses their weight without calling them (e.g. F.linear(x, layer.weight, ...)). Missing piece: an "
            "example that runs every layer, or an explicit BindingSpec"
        )

    parent: dict[str, str] = {}

    def find(n: str) -> str:
        while parent.setdefault(n, n) != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    first_reader: dict[tuple, str] = {}
    first_call: dict[str, int] = {}
    for call in calls:
        first_call.setdefault(call.name, call.index)
        find(call.name)
        other = first_reader.setdefault(call.key, call.name)
        parent[find(call.name)] = find(other)

    members: dict[str, list[str]] = {}
    for name in sorted(first_call, key=first_call.__getitem__):
        if id(by_name[name]) in block_of:
            members.setdefault(find(name), []).append(name)
    groups = []
    for linears in sorted(members.values(), key=lambda ls: first_call[ls[0]]):
        kind = "+".join(n.rsplit(".", 1)[-1] for n in linears)
        groups.append(BindingGroup(_group_name(linears), linears, kind, block_of[id(by_name[linears[0]])],
                                   Discovered(cls)))
    untargeted = [n for n in sorted(first_call, key=first_call.__getitem__) if id(by_name[n]) not in block_of]
    return DiscoveredSpec(cls, block_list, block_names, groups, untargeted, _family(model))


def cached_spec(model: nn.Module, example: Any = None) -> DiscoveredSpec | None:
    """The discovered spec of ``model`` for :func:`~permsparse.models.binding.get_spec`: discovered afresh on an
    explicit ``example``, else the cached one, else discovered on :func:`default_example` and cached; ``None``
    when no example is given and none can be built."""
    if example is None:
        if model in _CACHE:
            return _CACHE[model]
        example = default_example(model)
        if example is None:
            return None
    spec = discover_spec(model, example)
    _CACHE[model] = spec
    return spec


def binding_differences(model: nn.Module, spec: BindingSpec, other: BindingSpec) -> list[str]:
    """Where two specs of ``model`` bind differently, one line each (``[]``: the same groups, linear sets and
    block indices, in the same forward order, and the same block prefixes). Group names, kinds and producers may
    differ: an explicit spec names its groups and knows their producers, discovery does not."""

    def key(s: BindingSpec) -> list[tuple[frozenset[str], int]]:
        return [(frozenset(g.linears), g.block) for g in s.groups(model)]

    def show(group: tuple[frozenset[str], int]) -> str:
        return f"{{{', '.join(sorted(group[0]))}}} in block {group[1]}"

    a, b = key(spec), key(other)
    lines = [f"only {type(spec).__name__} binds {show(g)}" for g in a if g not in b]
    lines += [f"only {type(other).__name__} binds {show(g)}" for g in b if g not in a]
    if not lines and a != b:
        lines.append(f"same groups in another order: {type(spec).__name__} {[show(g) for g in a]} vs "
                     f"{type(other).__name__} {[show(g) for g in b]}")
    if spec.block_prefixes(model) != other.block_prefixes(model):
        lines.append(f"block prefixes differ: {spec.block_prefixes(model)} vs {other.block_prefixes(model)}")
    return lines
