"""Runtime input gathers for permuted linears whose permutation cannot be folded into a producer.

Choice (docs/method.md §6): a gathered layer becomes a :class:`PermutedLinear`, a
*subclass* of ``nn.Linear`` that owns the very same ``weight``/``bias`` parameters and a **non-persistent**
``input_perm`` buffer, and computes ``linear(x.index_select(-1, input_perm))``. Why not a wrapper module or
a hook:

* a wrapper (``Wrapper(linear)``) renames the state-dict keys (``o_proj.weight`` -> ``o_proj.linear.weight``),
  so the checkpoint no longer loads into the family's own class (HF ``from_pretrained``, timm);
* a forward pre-hook is invisible in ``print(model)``, lost by ``deepcopy``-free rebuilds and easy to forget;
* the subclass keeps state-dict keys identical to the stock model, stays ``isinstance(m, nn.Linear)``
  (binding specs, ``to_sparse_semi_structured`` and ``torch.compile`` keep working) and shows up in ``repr``.

The indices are *not* in the state dict (so the weights load into a stock model without unexpected keys);
the export sidecar stores them and :func:`permsparse.export.load_exported` re-inserts the gathers.
Loading an exported checkpoint that has gathers *without* that loader gives a wrong model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PermutedLinear", "insert_gather", "remove_gather", "find_gathers"]


class PermutedLinear(nn.Linear):
    """``nn.Linear`` that reads its input channels in permuted order: ``y = W x[..., input_perm] + b``.

    ``weight`` is stored in deployed (permuted, truly N:M) order; ``input_perm`` is a non-persistent long buffer.
    """

    input_perm: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.index_select(-1, self.input_perm), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_perm=({self.input_perm.numel()},)"

    @classmethod
    def from_linear(cls, linear: nn.Linear, perm: Tensor) -> PermutedLinear:
        """A ``PermutedLinear`` sharing ``linear``'s parameters (no copy), gathering with ``perm``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"can only gather the input of an nn.Linear, got {type(linear).__name__}")
        perm = torch.as_tensor(perm).long().reshape(-1)
        if perm.numel() != linear.in_features:
            raise ValueError(f"gather of {perm.numel()} indices for a linear with in_features={linear.in_features}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.register_buffer("input_perm", perm.to(linear.weight.device), persistent=False)
        new.train(linear.training)
        return new


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def insert_gather(model: nn.Module, name: str, perm: Tensor) -> PermutedLinear:
    """Replace the linear ``name`` of ``model`` by a :class:`PermutedLinear` that gathers its input with ``perm``.

    The weight is *not* touched: it must already be stored as ``W[:, perm]``. Re-inserting on a gathered
    layer replaces its indices.
    """
    linear = model.get_submodule(name)
    if isinstance(linear, PermutedLinear):
        linear = remove_gather(model, name)
    new = PermutedLinear.from_linear(linear, perm)
    _set_submodule(model, name, new)
    return new


def remove_gather(model: nn.Module, name: str) -> nn.Linear:
    """Turn the :class:`PermutedLinear` ``name`` back into a plain ``nn.Linear`` (same parameters)."""
    gathered = model.get_submodule(name)
    if not isinstance(gathered, PermutedLinear):
        raise ValueError(f"{name} is not a PermutedLinear (it is {type(gathered).__name__})")
    with torch.device("meta"):
        plain = nn.Linear(gathered.in_features, gathered.out_features, bias=gathered.bias is not None)
    plain.weight = gathered.weight
    plain.bias = gathered.bias
    plain.train(gathered.training)
    _set_submodule(model, name, plain)
    return plain


def find_gathers(model: nn.Module) -> dict[str, Tensor]:
    """Every gathered linear of ``model``: module name -> its ``input_perm`` (on CPU)."""
    return {name: m.input_perm.detach().cpu() for name, m in model.named_modules() if isinstance(m, PermutedLinear)}
