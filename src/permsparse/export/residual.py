"""One global residual-stream permutation, folded into the weights (docs/method.md §6).

The groups that read the normalised residual stream (``q,k,v`` / ``qkv``, ``gate,up``, ``fc1``) have no
producer rows to absorb their input permutation, so export gathers their input at run time. If *all* of
them use the same permutation ``p`` of the hidden channels, the residual stream itself can be stored in
permuted order, ``h' = h[..., p]``:

* everything that **writes** the stream permutes its hidden dimension: token embeddings (columns), the
  patch-embedding conv's output channels, class / register tokens and position embeddings, the output
  rows and biases of ``o_proj`` / ``down_proj`` / ``attn.proj`` / ``mlp.fc2``, LayerScale gammas;
* every **norm** on the stream permutes its weight (and bias): RMSNorm and LayerNorm reduce over all
  channels, so ``norm(h[p]) = norm'(h)[p]`` with ``norm'`` holding ``weight[p]``, ``bias[p]``;
* everything that **reads** it stores ``W[:, p]``: the bound readers (the ``residual`` groups) and the
  head / ``lm_head`` (a tied ``lm_head`` and ``embed_tokens`` are one tensor, permuted once).

The model then computes exactly the same function (up to float summation order), with no gather. Which
parameters these are is per-family knowledge: :meth:`BindingSpec.residual_params`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from permsparse.models.binding import BindingGroup, BindingSpec, get_spec
from permsparse.permutation.base import is_permutation
from permsparse.permutation.residual import is_residual

__all__ = ["fold_residual_permutation", "residual_groups", "shared_residual_perm", "hidden_size"]


def residual_groups(model: nn.Module, spec: BindingSpec | None = None) -> list[BindingGroup]:
    """The binding groups that read the residual stream (producer type ``residual``)."""
    spec = spec or get_spec(model)
    return [g for g in spec.groups(model) if is_residual(g)]


def hidden_size(model: nn.Module, spec: BindingSpec | None = None) -> int:
    """Width of the residual stream: the input width of the residual-reading linears."""
    groups = residual_groups(model, spec)
    if not groups:
        raise ValueError(f"{type(model).__name__}: no binding group reads the residual stream")
    return int(model.get_submodule(groups[0].linears[0]).in_features)


def shared_residual_perm(groups: list[BindingGroup], perms: Mapping[str, Tensor]) -> Tensor | None:
    """The one permutation every residual-reading group uses, or ``None`` if they differ (or there are none)."""
    residual = [g for g in groups if is_residual(g)]
    if not residual:
        return None
    first = torch.as_tensor(perms[residual[0].name]).long().reshape(-1).cpu()
    for g in residual[1:]:
        other = torch.as_tensor(perms[g.name]).long().reshape(-1).cpu()
        if other.shape != first.shape or not torch.equal(other, first):
            return None
    return first


@torch.no_grad()
def fold_residual_permutation(model: nn.Module, perm: Tensor, spec: BindingSpec | None = None,
                              readers: bool = True) -> nn.Module:
    """Permute ``model``'s residual stream by ``perm`` in place; the function it computes is unchanged.

    ``perm`` (``(hidden,)``, ``h' = h[..., perm]``) is applied to every parameter of
    :meth:`BindingSpec.residual_params` and, with ``readers`` (default), to the input columns of the bound
    residual-reading linears (``W[:, perm]``). ``readers=False`` leaves those to the caller
    (:func:`~permsparse.export.fold.fold_model` permutes them with their group permutation). Each tensor is
    permuted once even when shared (tied embeddings). Returns ``model``.
    """
    spec = spec or get_spec(model)
    d = hidden_size(model, spec)
    perm = torch.as_tensor(perm).long().reshape(-1).cpu()
    if not is_permutation(perm, d):
        raise ValueError(f"residual-stream permutation must be a bijection of range({d}) (the hidden size); "
                         f"got {perm.numel()} indices")
    entries = list(spec.residual_params(model))
    if readers:
        entries += [(f"{name}.weight", 1) for g in residual_groups(model, spec) for name in g.linears]
    done: dict[int, str] = {}
    for name, dim in entries:
        param = model.get_parameter(name)
        if id(param) in done:
            continue  # tied (e.g. lm_head.weight is embed_tokens.weight): one tensor, one permutation
        if param.shape[dim] != d:
            raise ValueError(f"{name}: dim {dim} has {param.shape[dim]} entries, the residual stream {d}; "
                             f"binding spec {type(spec).__name__}.residual_params is wrong for this model")
        new = param.detach().index_select(dim, perm.to(param.device))
        param.copy_(new)
        done[id(param)] = name
    return model
