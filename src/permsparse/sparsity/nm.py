"""N:M masks along the input dimension: keep the N largest scores in every run of M input channels.

Conventions (docs/method.md §1): a weight has shape ``(d_out, d_in)``; groups are M *consecutive*
input channels of one output row; ties break towards the lower input index so that the mask is a
deterministic function of the scores (dequantised 4-bit checkpoints have many equal magnitudes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NMPattern", "nm_mask", "keep_top_n_planes", "check_nm_shape", "check_nm_scores", "check_nm", "is_nm",
           "nm_kept_score"]

_PATTERN_RE = re.compile(r"^\s*(-?\d+)\s*[:/]\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """An N:M pattern: keep ``n`` of every ``m`` consecutive input channels."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or isinstance(self.m, bool) or not isinstance(self.n, int) or not isinstance(
            self.m, int
        ):
            raise ValueError(f"N:M pattern needs integers, got n={self.n!r}, m={self.m!r}")
        if self.m < 1:
            raise ValueError(f"N:M pattern {self.n}:{self.m}: M must be >= 1 (got M={self.m})")
        if self.n < 1:
            raise ValueError(f"N:M pattern {self.n}:{self.m}: N must be >= 1 (got N={self.n}); N is the number kept")
        if self.n > self.m:
            raise ValueError(f"N:M pattern {self.n}:{self.m}: N must not exceed M (got N={self.n} > M={self.m})")

    @classmethod
    def parse(cls, value: str | NMPattern | tuple[int, int] | list[int]) -> NMPattern:
        """Parse ``"2:4"``, ``"2/4"``, ``(2, 4)`` or an ``NMPattern``; a bad value raises ``ValueError``."""
        if isinstance(value, NMPattern):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(int(value[0]), int(value[1]))
        if isinstance(value, str):
            match = _PATTERN_RE.match(value)
            if match is None:
                raise ValueError(f"cannot parse N:M pattern {value!r}: expected 'N:M' such as '2:4' or '4:8'")
            return cls(int(match.group(1)), int(match.group(2)))
        raise ValueError(f"cannot parse N:M pattern {value!r}: expected 'N:M' such as '2:4' or '4:8'")

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def check_nm_shape(shape: tuple[int, ...] | torch.Size, pattern: NMPattern, name: str = "tensor") -> None:
    """Raise ``ValueError`` naming the layer and the numbers if ``shape`` cannot carry ``pattern``."""
    if len(shape) != 2:
        raise ValueError(f"{name}: N:M sparsity needs a 2-D weight (d_out, d_in), got shape {tuple(shape)}")
    d_in = shape[1]
    if d_in == 0 or d_in % pattern.m != 0:
        raise ValueError(
            f"{name}: d_in={d_in} is not divisible by M={pattern.m} (pattern {pattern}); "
            f"choose an M that divides {d_in} or exclude this layer"
        )


def check_nm_scores(scores: Tensor, pattern: NMPattern, name: str = "tensor",
                    purpose: str = "choose an N:M mask") -> None:
    """Validator for scores an N:M choice is made on: a 2-D shape that carries ``pattern`` and no NaN or Inf
    (the error names the layer and what could not be done: ``purpose``)."""
    check_nm_shape(scores.shape, pattern, name)
    if scores.is_floating_point() and not torch.isfinite(scores).all():
        raise ValueError(f"{name}: scores contain NaN or Inf; cannot {purpose}")


def _group_ranks(scores: Tensor, m: int) -> Tensor:
    """Rank (0 = largest) of every entry inside its group of ``m`` consecutive columns, lower index first on ties."""
    d_out, d_in = scores.shape
    grouped = scores.reshape(d_out, d_in // m, m)
    # A stable descending sort keeps equal scores in index order, so the lower input index ranks first.
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(m, device=scores.device).expand_as(order))
    return ranks.reshape(d_out, d_in)


# Up to this M the mask comes from pairwise comparisons (M (M - 1) / 2 elementwise ops on contiguous planes),
# which on CPU is 3-5x faster than sorting millions of tiny groups; larger M sorts.
_PAIRWISE_MAX_M = 8


def keep_top_n_planes(planes: Tensor, n: int) -> Tensor:
    """The N:M choice on scores laid out as ``M`` planes: ``planes[j]`` holds position ``j`` of every group.

    Returns a bool tensor of ``planes``' shape, True for the ``n`` largest of each group (the entries at
    the same index of every plane); on ties the lower position wins, as in :func:`nm_mask`.
    """
    m = planes.shape[0]
    if m > _PAIRWISE_MAX_M:
        flat = planes.reshape(m, -1).T  # (groups, m)
        return (_group_ranks(flat, m) < n).T.reshape(planes.shape)
    # beaten[j] = how many entries of the group outrank entry j. Start from j (every lower position outranks j
    # unless j wins) and move one point per pairwise win; uint8 throughout (bools viewed as uint8, no copies):
    # intermediate values may wrap around, the final counts in [0, m) are exact.
    beaten = torch.arange(m, dtype=torch.uint8, device=planes.device).reshape(-1, *([1] * (planes.dim() - 1)))
    beaten = beaten.expand(planes.shape).clone()
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = (planes[j] > planes[i]).view(torch.uint8)  # strictly: on a tie the lower position i wins
            beaten[i].add_(j_wins)  # not "+=": that would also write the row back through __setitem__
            beaten[j].sub_(j_wins)
    return beaten < n


def nm_mask(scores: Tensor, pattern: NMPattern | str, name: str = "tensor") -> Tensor:
    """Boolean mask keeping the ``n`` largest scores of every ``m`` consecutive input channels of each row.

    ``scores`` is ``(d_out, d_in)``; the result has the same shape and exactly ``n`` True per group.
    """
    pattern = NMPattern.parse(pattern)
    check_nm_scores(scores, pattern, name)
    d_out, d_in = scores.shape
    if pattern.m > _PAIRWISE_MAX_M:
        return _group_ranks(scores.detach(), pattern.m) < pattern.n
    planes = scores.detach().reshape(d_out, d_in // pattern.m, pattern.m).permute(2, 0, 1).contiguous()
    return keep_top_n_planes(planes, pattern.n).permute(1, 2, 0).reshape(d_out, d_in)


def nm_kept_score(scores: Tensor, pattern: NMPattern | str) -> Tensor:
    """Total score kept by the N:M mask of ``scores`` (a scalar tensor)."""
    pattern = NMPattern.parse(pattern)
    check_nm_shape(scores.shape, pattern)
    d_out, d_in = scores.shape
    top = scores.reshape(d_out, d_in // pattern.m, pattern.m).topk(pattern.n, dim=-1).values
    return top.sum()


def is_nm(tensor: Tensor, pattern: NMPattern | str, exact: bool = False) -> bool:
    """True if every group of M consecutive input channels holds at most N non-zeros (exactly N if ``exact``)."""
    pattern = NMPattern.parse(pattern)
    if tensor.dim() != 2 or tensor.shape[1] % pattern.m != 0:
        return False
    counts = (tensor != 0).reshape(tensor.shape[0], -1, pattern.m).sum(-1)
    return bool((counts == pattern.n).all() if exact else (counts <= pattern.n).all())


def check_nm(tensor: Tensor, pattern: NMPattern | str, name: str = "tensor", exact: bool = False) -> None:
    """Validator: raise ``ValueError`` naming the layer, the first bad row/group and its count if not N:M.

    Weights may legitimately hold extra zeros, so by default a group passes with *at most* N non-zeros;
    ``exact=True`` (for masks) demands exactly N.
    """
    pattern = NMPattern.parse(pattern)
    check_nm_shape(tensor.shape, pattern, name)
    counts = (tensor != 0).reshape(tensor.shape[0], -1, pattern.m).sum(-1)
    bad = counts != pattern.n if exact else counts > pattern.n
    if bad.any():
        row, group = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: not {pattern}-sparse: row {row}, input channels {group * pattern.m}..{(group + 1) * pattern.m - 1} "
            f"hold {int(counts[row, group])} non-zeros ({int(bad.sum())} bad groups in all)"
        )
