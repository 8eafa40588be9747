"""2:4 hardware kernels: turn deployed (permuted, truly 2:4) linears into semi-structured sparse tensors.

PyTorch's ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS) runs 2:4 matmuls on NVIDIA
GPUs of compute capability >= 8.0 (Ampere, Hopper) in fp16/bf16. The weight must already be 2:4 *in memory*,
i.e. folded (:func:`permsparse.export.fold_model` / :func:`permsparse.export.load_exported`); gathered layers
(:class:`~permsparse.export.gather.PermutedLinear`) keep their gather and call the sparse kernel after it.
"""

from __future__ import annotations

import torch
from torch import nn

from permsparse.models.binding import BindingSpec, get_spec
from permsparse.sparsity.nm import NMPattern, check_nm

__all__ = ["semi_structured_support", "semi_structured_constraints", "to_semi_structured"]

_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_support(device: torch.device | str | int | None = None) -> tuple[bool, str]:
    """Whether this machine can run 2:4 semi-structured kernels, and a one-line description why (not)."""
    if not torch.cuda.is_available():
        return False, ("no CUDA device (CPU-only machine): 2:4 semi-structured kernels need an NVIDIA GPU "
                       "with compute capability >= 8.0")
    cap = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if cap < (8, 0):
        return False, f"{name} has compute capability {cap[0]}.{cap[1]}; 2:4 kernels need >= 8.0 (Ampere or newer)"
    return True, f"{name}, compute capability {cap[0]}.{cap[1]}"


def semi_structured_constraints(dtype: torch.dtype) -> tuple[int, int]:
    """``(min_rows, min_cols)`` a weight of ``dtype`` must be a multiple of for the active 2:4 backend."""
    from torch.sparse import SparseSemiStructuredTensor
    from torch.sparse.semi_structured import (
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cls = (SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
           else SparseSemiStructuredTensorCUSPARSELT)
    if dtype not in cls._DTYPE_SHAPE_CONSTRAINTS:
        raise ValueError(f"{cls.__name__} does not support {dtype}")
    c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return c.sparse_min_rows, c.sparse_min_cols


@torch.no_grad()
def to_semi_structured(
    model: nn.Module,
    pattern: NMPattern | str = "2:4",
    spec: BindingSpec | None = None,
    names: list[str] | None = None,
    strict: bool = True,
) -> dict[str, str]:
    """Replace the weight of every bound (deployed-order) linear by a 2:4 semi-structured sparse tensor, in place.

    Refuses (``ValueError``) any pattern but 2:4, and (``RuntimeError``) a machine without a CUDA GPU of
    compute capability >= 8.0. Every weight must be on CUDA, fp16/bf16, and 2:4 as stored (fold first).
    A layer whose shape the kernel cannot take raises with ``strict``, else it stays dense. Returns
    ``{linear name: "2:4" or why it stayed dense}``. Inference only (the weights become non-trainable).
    """
    from torch.sparse import to_sparse_semi_structured

    pattern = NMPattern.parse(pattern)
    if (pattern.n, pattern.m) != (2, 4):
        raise ValueError(f"semi-structured sparse kernels exist only for 2:4, not {pattern}; "
                         "keep other patterns as dense masked weights")
    ok, why = semi_structured_support()
    if not ok:
        raise RuntimeError(f"cannot use 2:4 semi-structured kernels: {why}")
    if names is None:
        spec = spec or get_spec(model)
        names = [n for g in spec.groups(model) for n in g.linears]
    out: dict[str, str] = {}
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if not weight.is_cuda:
            raise ValueError(f"{name}: weight is on {weight.device}; move the model to CUDA first")
        if weight.dtype not in _DTYPES:
            raise ValueError(f"{name}: weight dtype {weight.dtype}; 2:4 kernels need float16 or bfloat16 "
                             "(cast the model first, e.g. model.half())")
        try:
            check_nm(weight, pattern, name)
        except ValueError as e:
            raise ValueError(f"{e}. 2:4 kernels need the deployed (folded) weights: use fold_model or "
                             "load_exported first") from e
        min_rows, min_cols = semi_structured_constraints(weight.dtype)
        rows, cols = weight.shape
        if rows % min_rows or cols % min_cols:
            msg = (f"shape {rows}x{cols} is not a multiple of ({min_rows}, {min_cols}) required by the 2:4 "
                   f"kernel for {weight.dtype}")
            if strict:
                raise ValueError(f"{name}: {msg}; pass strict=False to keep such layers dense")
            out[name] = f"dense: {msg}"
            continue
        linear.weight = nn.Parameter(to_sparse_semi_structured(weight.contiguous()), requires_grad=False)
        out[name] = "2:4"
    return out
