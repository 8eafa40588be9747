"""Binding specs: explicit, per-architecture knowledge of which linears share one input permutation.

Layers that read the same tensor must be permuted together (METHOD.md section 3). A spec lists,
for a model family, every *binding group* (the linears, their block, and who produces their input,
which export needs to fold the permutation into the producer's output rows). Adding a family is
adding one :class:`BindingSpec` subclass and registering it; nothing here traces graphs or matches
model names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import nn

__all__ = ["BindingGroup", "BindingSpec", "register_spec", "get_spec", "SPECS"]


@dataclass
class BindingGroup:
    """Linears that read the same input and so share one input-channel permutation.

    Attributes:
        name: unique, stable name, e.g. ``"blocks.3.fc2"``; used as key in results and checkpoints.
        linears: module names (``model.get_submodule``) of the bound ``nn.Linear`` layers.
        kind: role inside the block (``qkv``, ``o``, ``gate_up``, ``down``, ``proj``, ``fc1``, ``fc2``).
        block: index of the Transformer block the group belongs to.
        producer: how the input is produced, for folding: ``{"type": "residual"}`` for the
            normalised residual stream; ``{"type": "rows", "modules": [...]}`` when the input is the
            output rows of those linears (through an elementwise function); ``{"type": "v_rows",
            "module": name, "rows": (start, stop), "head_dim": d, "num_heads": h, "num_kv_heads": k}``
            for an attention output projection (the value rows, foldable only within heads).
    """

    name: str
    linears: list[str]
    kind: str
    block: int
    producer: dict = field(default_factory=dict)


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


def get_spec(model: nn.Module) -> BindingSpec:
    """The registered spec that matches ``model``; a clear error if no family describes it."""
    for spec in SPECS:
        if spec.matches(model):
            return spec()
    known = ", ".join(s.family for s in SPECS) or "none registered"
    raise ValueError(
        f"no binding spec for model class {type(model).__name__}; known families: {known}. "
        "Add a BindingSpec subclass in permsparse.models and register it with @register_spec"
    )
