"""Binding specs: explicit, per-architecture knowledge of which linears share one input permutation.

Layers that read the same tensor must be permuted together (docs/method.md §3). A spec lists,
for a model family, every *binding group* (the linears, their block, and who produces their input,
which export needs to fold the permutation into the producer's output rows). Adding a family is
adding one :class:`BindingSpec` subclass and registering it; nothing here traces graphs or matches
model names.

The producer of a group's input is one of four small records: :class:`ResidualStream`,
:class:`OutputRows`, :class:`ValueRows` or :class:`Opaque` (with two opaque subclasses: :class:`Discovered`, the
producer of a group found by binding discovery, and :class:`SecondStream`, the residual stream of a second tower
such as a vision encoder); code asks ``isinstance``, never a string.

A model that no registered spec matches can still be bound by *discovery* (:mod:`permsparse.models.discovery`):
:func:`get_spec` falls back to it when it is given, or can build, an example input.

A model can be told to keep some of its groups dense (:func:`leave_dense`, what ``prune.skip_indivisible=true``
does for the groups that cannot be pruned to the pattern): :func:`get_spec` then returns its spec without them
(:class:`WithoutGroups`), so pruning, learning, calibration and export all leave those linears alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from permsparse.errors import ConfigError

__all__ = ["BindingGroup", "BindingSpec", "register_spec", "get_spec", "SPECS", "Producer", "ResidualStream",
           "OutputRows", "ValueRows", "Opaque", "Discovered", "SecondStream", "WithoutGroups", "leave_dense", "left_dense"]


@dataclass(frozen=True)
class Producer:
    """How a binding group's input is produced: what export can fold the group's permutation into.

    ``kind`` is a stable one-word name for reports and result files.
    """

    kind: ClassVar[str] = "abstract"


@dataclass(frozen=True)
class ResidualStream(Producer):
    """The normalised residual stream (``q,k,v`` / ``qkv``, ``gate,up``, ``fc1``): foldable only as one
    permutation shared by every residual reader (``perm.residual=shared``)."""

    kind: ClassVar[str] = "residual"


@dataclass(frozen=True)
class OutputRows(Producer):
    """The output rows of ``modules`` through an elementwise function (``down`` after ``gate``/``up``,
    ``fc2`` after ``fc1``): always foldable into those rows (and biases).

    ``chunks``: each module's output is that many equal consecutive parts, each one elementwise-linked to the
    group's input channels (a fused ``gate_up_proj`` whose output is split by ``chunk(2, dim=-1)`` into gate and
    up, as in Phi-3): the permutation is applied to every part's rows alike.
    """

    modules: tuple[str, ...]
    chunks: int = 1
    kind: ClassVar[str] = "rows"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(self.modules))
        if int(self.chunks) < 1:
            raise ValueError(f"OutputRows.chunks must be >= 1, got {self.chunks}")
        object.__setattr__(self, "chunks", int(self.chunks))


@dataclass(frozen=True)
class ValueRows(Producer):
    """The concatenated attention heads (``o_proj`` / ``attn.proj``): foldable into the value rows
    ``rows = (start, stop)`` of ``module`` only within heads, identically for the query heads that share
    one kv head."""

    module: str
    rows: tuple[int, int]
    head_dim: int
    num_heads: int
    num_kv_heads: int
    kind: ClassVar[str] = "v_rows"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", (int(self.rows[0]), int(self.rows[1])))

    @property
    def head_layout(self) -> tuple[int, int, int]:
        """``(head_dim, num_heads, num_kv_heads)``."""
        return int(self.head_dim), int(self.num_heads), int(self.num_kv_heads or self.num_heads)


@dataclass(frozen=True)
class Opaque(Producer):
    """Anything else (e.g. a norm between ``fc1`` and ``fc2``): not foldable, export gathers."""

    kind: ClassVar[str] = "none"


@dataclass(frozen=True)
class Discovered(Opaque):
    """The input of a group found by binding discovery (:mod:`permsparse.models.discovery`): which linears read
    it is known, who produces it is not (no explicit spec for ``model_class``), so export gathers."""

    model_class: str = ""
    kind: ClassVar[str] = "discovered"


@dataclass(frozen=True)
class SecondStream(Opaque):
    """The normalised residual stream of a second tower of the model (``stream``: e.g. ``"vision tower"``), beside
    the main one that :class:`ResidualStream` names. Its readers could share one permutation of that stream, but
    permsparse folds one residual-stream permutation per model (``perm.residual=shared``: the main stream's), so
    export gathers these groups' permutations at run time and says so."""

    stream: str = ""
    kind: ClassVar[str] = "second_stream"


@dataclass
class BindingGroup:
    """Linears that read the same input and so share one input-channel permutation.

    Attributes:
        name: unique, stable name, e.g. ``"blocks.3.fc2"``; used as key in results and checkpoints.
        linears: module names (``model.get_submodule``) of the bound ``nn.Linear`` layers.
        kind: role inside the block (``qkv``, ``o``, ``gate_up``, ``down``, ``proj``, ``fc1``, ``fc2``).
        block: index of the Transformer block the group belongs to.
        producer: how the input is produced, for folding (a :class:`Producer` record).
    """

    name: str
    linears: list[str]
    kind: str
    block: int
    producer: Producer = field(default_factory=Opaque)


class BindingSpec(ABC):
    """Architecture knowledge for one model family."""

    family: str = "abstract"

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True if this spec describes ``model`` (by class, never by name string)."""

    @abstractmethod
    def groups(self, model: nn.Module) -> list[BindingGroup]:
        """Every binding group of the prunable linears, in forward order."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The Transformer blocks in forward order (for sequential calibration and block losses)."""

    @abstractmethod
    def block_prefixes(self, model: nn.Module) -> list[str]:
        """Module-name prefix of every block, aligned with :meth:`blocks`."""

    def residual_params(self, model: nn.Module) -> list[tuple[str, int]]:
        """Every parameter that carries the residual stream's channels, except the bound readers' inputs.

        ``(parameter name, dim)`` pairs: ``dim`` of that parameter is indexed by the hidden (residual) channel.
        That is what :func:`permsparse.export.residual.fold_residual_permutation` permutes to move one global
        permutation into the residual stream: embeddings and tokens, every norm on the stream (weight and
        bias), the output rows (and biases) of every writer (attention and MLP output projections), layer
        scales, and the input columns of readers that are *not* in a ``residual`` binding group (the head /
        ``lm_head``). The bound readers (producer ``residual`` groups) come from :meth:`groups`. Tied
        parameters may appear twice; the fold permutes each tensor once. Families that do not describe
        their residual stream cannot fold a residual-stream permutation (export gathers instead).
        """
        raise NotImplementedError(
            f"binding spec {type(self).__name__} ({self.family}) does not list its residual-stream parameters; "
            "implement residual_params(model) to fold a shared residual-stream permutation"
        )


SPECS: list[type[BindingSpec]] = []


def register_spec(spec: type[BindingSpec]) -> type[BindingSpec]:
    """Class decorator that makes a spec discoverable by :func:`get_spec`."""
    SPECS.append(spec)
    return spec


#: attribute of a model that holds ``{group name: reason}`` of the groups it keeps dense (:func:`leave_dense`); an
#: attribute, not a registry, so that it travels with ``copy.deepcopy`` (export folds a copy)
_DENSE_ATTR = "_permsparse_dense_groups"


def leave_dense(model: nn.Module, groups: Mapping[str, str]) -> nn.Module:
    """Mark binding groups of ``model`` to stay dense and unpermuted: ``{group name: why}``, added to any marked
    before. From then on :func:`get_spec` returns ``model``'s spec without them (:class:`WithoutGroups`). Returns
    ``model``."""
    marked = {**left_dense(model), **{str(k): str(v) for k, v in groups.items()}}
    object.__setattr__(model, _DENSE_ATTR, marked)
    return model


def left_dense(model: nn.Module) -> dict[str, str]:
    """The groups :func:`leave_dense` marked on ``model``, ``{group name: why}`` (empty if none)."""
    return dict(getattr(model, _DENSE_ATTR, None) or {})


class WithoutGroups(BindingSpec):
    """``base`` without the groups named in ``dense``: their linears are bound to nothing, so nothing prunes,
    permutes, learns or folds them. Everything else (blocks, family, residual stream) is ``base``'s.

    The residual stream gains the input columns of every left-out group that read it (``ResidualStream``
    producer): they are dense readers now, like ``lm_head``, and a residual-stream permutation must reach them.
    """

    def __init__(self, base: BindingSpec, dense: Mapping[str, str]) -> None:
        self.base = base
        self.dense = dict(dense)
        self.family = base.family

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False  # built by get_spec for a model marked by leave_dense

    def all_groups(self, model: nn.Module) -> list[BindingGroup]:
        return self.base.groups(model)

    def groups(self, model: nn.Module) -> list[BindingGroup]:
        return [g for g in self.base.groups(model) if g.name not in self.dense]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.base.blocks(model)

    def block_prefixes(self, model: nn.Module) -> list[str]:
        return self.base.block_prefixes(model)

    def residual_params(self, model: nn.Module) -> list[tuple[str, int]]:
        readers = [(f"{name}.weight", 1) for g in self.base.groups(model)
                   if g.name in self.dense and isinstance(g.producer, ResidualStream) for name in g.linears]
        return [*self.base.residual_params(model), *readers]

    def __getattr__(self, name: str) -> Any:  # the base spec's own extras (DiscoveredSpec.untargeted, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"WithoutGroups({self.base!r}, dense={sorted(self.dense)})"


def _with_dense(model: nn.Module, spec: BindingSpec) -> BindingSpec:
    dense = left_dense(model)
    if not dense:
        return spec
    names = {g.name for g in spec.groups(model)}
    unknown = sorted(set(dense) - names)
    if unknown:
        raise ConfigError(f"{type(model).__name__}: groups marked to stay dense are not binding groups of "
                          f"{type(spec).__name__}: {', '.join(unknown)}")
    return WithoutGroups(spec, dense)


def get_spec(model: nn.Module, example: Any = None, discover: bool = True) -> BindingSpec:
    """The registered spec that matches ``model``; else, with ``discover``, a spec found by binding discovery.

    An explicit (registered) spec always wins: it carries the folding knowledge. Without one, discovery
    (:func:`permsparse.models.discovery.discover_spec`) runs one forward pass on ``example`` (a tensor, a tuple of
    positional arguments or a mapping of keyword arguments). Without ``example`` it builds one where it knows how
    (a few token ids for a Hugging Face model, a zero image of ``pretrained_cfg["input_size"]`` for a timm model)
    and caches the result per model object, so that the many ``get_spec(model)`` calls of one run discover once;
    an explicit ``example`` always discovers afresh. Raises :class:`~permsparse.errors.ConfigError` if no spec
    matches and discovery is off or impossible (no example can be built), or names the missing piece if the
    discovered binding cannot be used (e.g. a layer type discovery does not handle). A model marked by
    :func:`leave_dense` gets its spec without those groups (:class:`WithoutGroups`).
    """
    for spec in SPECS:
        if spec.matches(model):
            return _with_dense(model, spec())
    if discover:
        from permsparse.models import discovery

        found = discovery.cached_spec(model, example)
        if found is not None:
            return _with_dense(model, found)
    known = ", ".join(s.family for s in SPECS) or "none registered"
    hint = ("or pass an example input, get_spec(model, example=...), to discover its binding from a forward pass"
            if discover else "or allow binding discovery (discover=True) with an example input")
    raise ConfigError(
        f"no binding spec for model class {type(model).__name__}; known families: {known}. "
        f"Add a BindingSpec subclass in permsparse.models and register it with @register_spec, {hint}"
    )
