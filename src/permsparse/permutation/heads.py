"""Permutation algebra of attention heads: which permutations of ``o_proj`` / ``attn.proj`` fold into ``v``.

The input of an attention output projection is the concatenation of ``num_heads`` head outputs of
``head_dim`` channels each. Its input permutation ``perm`` folds into the value rows of ``v`` (docs/method.md
§6) iff every head's block maps onto itself and, with grouped-query attention, the query heads that share
one kv head (``h // (num_heads // num_kv_heads)``) use the same local permutation: they read the same
``v`` rows. A foldable permutation is therefore described by ``(num_kv_heads, head_dim)`` local ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from permsparse.permutation.base import invert

__all__ = ["as_perm", "kv_head_perms", "restrict_to_heads", "expand_kv_head_perms"]


def as_perm(perm: Tensor | Any) -> Tensor:
    """``perm`` (a tensor or a list) as a flat long CPU tensor."""
    return torch.as_tensor(perm).detach().long().reshape(-1).cpu()


def kv_head_perms(perm: Tensor, head_dim: int, num_heads: int, num_kv_heads: int) -> tuple[Tensor | None, str]:
    """The per-kv-head permutations ``(num_kv_heads, head_dim)`` of an attention output permutation, if any.

    Returns ``(local, "")`` when ``perm`` is foldable (within heads, identical across the query heads of each
    kv head), else ``(None, why)`` with a one-line reason.
    """
    perm = as_perm(perm)
    if num_heads % num_kv_heads:
        return None, f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
    if perm.numel() != num_heads * head_dim:
        return None, f"permutation has {perm.numel()} channels, heads give {num_heads} x {head_dim}"
    local = perm.reshape(num_heads, head_dim) - torch.arange(num_heads).unsqueeze(1) * head_dim
    crossing = ((local < 0) | (local >= head_dim)).any(dim=1)
    if crossing.any():
        heads = crossing.nonzero().flatten().tolist()
        return None, (f"permutation crosses heads (query heads {heads[:8]}{'...' if len(heads) > 8 else ''} "
                      f"take channels of other heads; head_dim={head_dim})")
    rep = num_heads // num_kv_heads
    grouped = local.reshape(num_kv_heads, rep, head_dim)
    differ = (grouped != grouped[:, :1]).any(dim=2).any(dim=1)
    if differ.any():
        kv = differ.nonzero().flatten().tolist()
        return None, (f"within-head permutation differs across the {rep} query heads sharing kv head(s) "
                      f"{kv[:8]} (grouped-query attention: they read the same v rows)")
    return grouped[:, 0].clone(), ""


def restrict_to_heads(perm: Tensor, head_dim: int, num_heads: int, num_kv_heads: int | None = None) -> Tensor:
    """The foldable permutation closest in spirit to ``perm``: within heads, identical across GQA query heads.

    For kv head ``j`` the local order is the order in which ``perm`` places the channels of the first query
    head of that kv group (``h0 = j * num_heads // num_kv_heads``); every query head of the group gets it.
    Idempotent, and the identity on permutations that are already foldable (modulo GQA ties, where the
    first query head wins). Masks must be recomputed for the returned permutation. A learned method can
    instead tie its costs per kv head and build the permutation with :func:`expand_kv_head_perms`.
    """
    perm = as_perm(perm)
    num_kv_heads = num_kv_heads or num_heads
    if perm.numel() != num_heads * head_dim or num_heads % num_kv_heads:
        raise ValueError(f"cannot restrict a permutation of {perm.numel()} channels to {num_heads} heads x "
                         f"{head_dim} (kv heads {num_kv_heads})")
    rep = num_heads // num_kv_heads
    position = invert(perm)
    local = torch.stack([
        torch.argsort(position[j * rep * head_dim:(j * rep + 1) * head_dim], stable=True)
        for j in range(num_kv_heads)
    ])
    return expand_kv_head_perms(local, num_heads)


def expand_kv_head_perms(local: Tensor, num_heads: int) -> Tensor:
    """``(num_kv_heads, head_dim)`` local permutations -> the ``(num_heads * head_dim,)`` foldable permutation."""
    local = torch.as_tensor(local).long()
    num_kv_heads, head_dim = local.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    per_head = local.repeat_interleave(num_heads // num_kv_heads, dim=0)
    return (per_head + torch.arange(num_heads).unsqueeze(1) * head_dim).reshape(-1)
