"""Quality metrics of a permutation: Apex's *efficacy* and the kept-score ratio (docs/method.md §5).

Both compare the score kept by the N:M mask of the permuted scores ``S[:, perm]`` with the score kept
in the original channel order (identity). Efficacy also needs the best any mask of the same density
could do: every row pruned *unstructured*, keeping its ``d_in * N / M`` largest scores (``rowwise``).
No permutation can keep more than that, so efficacy is the fraction of the achievable gain over
identity that the permutation realises: 0 for identity, 1 for a perfect permutation (possibly > 1
only through float rounding, never negative for methods that never lose to identity).

All sums are taken in float64 so that small differences between large totals are not rounding noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from permsparse.permutation.base import is_permutation
from permsparse.sparsity.nm import NMPattern, check_nm_shape, nm_kept_score

__all__ = ["efficacy", "efficacy_of", "kept_ratio", "kept_ratio_of", "kept_scores"]


def _checked(scores: Tensor, perm: Tensor, pattern: NMPattern | str, name: str) -> tuple[Tensor, NMPattern]:
    pattern = NMPattern.parse(pattern)
    check_nm_shape(scores.shape, pattern, name)
    d_in = scores.shape[1]
    if perm.dim() != 1 or perm.numel() != d_in or not is_permutation(perm.to(scores.device), d_in):
        raise ValueError(
            f"{name}: perm must be a permutation of range({d_in}) of shape ({d_in},), got shape {tuple(perm.shape)}"
        )
    return scores.detach().to(torch.float64), pattern


def kept_scores(
    scores: Tensor, perm: Tensor, pattern: NMPattern | str, name: str = "group"
) -> dict[str, float]:
    """Total, identity-kept, permuted-kept and row-wise-kept score (float64 sums, returned as floats).

    ``rowwise`` keeps the ``d_in * N / M`` largest scores of every row: the upper bound of any
    permutation at this density.
    """
    s, pattern = _checked(scores, perm, pattern, name)
    d_in = s.shape[1]
    keep = d_in * pattern.n // pattern.m
    return {
        "total": float(s.sum()),
        "identity": float(nm_kept_score(s, pattern)),
        "method": float(nm_kept_score(s[:, perm.to(s.device).long()], pattern)),
        "rowwise": float(s.topk(keep, dim=1).values.sum()),
    }


def efficacy(
    scores: Tensor,
    perm: Tensor,
    pattern: NMPattern | str,
    name: str = "group",
    degenerate: float = 0.0,
) -> float:
    """Apex's efficacy ``(lost_identity - lost_method) / (lost_identity - lost_rowwise)``.

    ``lost = total - kept``. When identity already keeps as much as the row-wise bound (denominator
    0: nothing can be gained, e.g. N == M or rows that are constant within every group), the ratio
    is undefined and ``degenerate`` is returned: by default 0.0 ("no gain realised; none was
    possible"), which keeps plain means over groups finite; pass ``math.nan`` to mark such groups.
    """
    return efficacy_of(kept_scores(scores, perm, pattern, name), degenerate)


def efficacy_of(k: dict[str, float], degenerate: float = 0.0) -> float:
    """:func:`efficacy` from :func:`kept_scores` already computed (to get several metrics from one pass)."""
    denominator = k["rowwise"] - k["identity"]
    # Relative tolerance: differences of large float64 totals below ~1e-12 of their size are rounding.
    if denominator <= 1e-12 * max(abs(k["rowwise"]), 1e-300):
        return degenerate
    return (k["method"] - k["identity"]) / denominator


def kept_ratio(scores: Tensor, perm: Tensor, pattern: NMPattern | str, name: str = "group") -> float:
    """``kept_method / kept_identity``: 1.0 for identity, > 1 when the permutation keeps more.

    If identity keeps nothing (all-zero scores) the ratio is 1.0 when the method keeps nothing too,
    else infinity.
    """
    return kept_ratio_of(kept_scores(scores, perm, pattern, name))


def kept_ratio_of(k: dict[str, float]) -> float:
    """:func:`kept_ratio` from :func:`kept_scores` already computed."""
    if k["identity"] == 0.0:
        return 1.0 if k["method"] == 0.0 else math.inf
    return k["method"] / k["identity"]
