"""RIA channel permutation: snake reallocation, optimal assignment per position, never below identity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from permsparse.permutation.base import is_permutation
from permsparse.permutation.efficacy import efficacy
from permsparse.permutation.ria_cp import RIAChannelPermutation, snake_reallocation
from permsparse.sparsity.nm import NMPattern, nm_kept_score

PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (1, 2), (2, 3)]


def kept(scores: torch.Tensor, perm: torch.Tensor, pattern: NMPattern) -> float:
    return float(nm_kept_score(scores.double()[:, perm], pattern))


@settings(max_examples=60, deadline=None)
@given(
    nm=st.sampled_from(PATTERNS),
    rows=st.integers(1, 9),
    groups=st.integers(1, 7),
    ties=st.booleans(),
    lsa=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bijection_and_never_below_identity(nm, rows, groups, ties, lsa, seed) -> None:
    pattern = NMPattern(*nm)
    scores = torch.rand(rows, groups * pattern.m, generator=torch.Generator().manual_seed(seed))
    if ties:
        scores = (scores * 3).floor()
    perm = RIAChannelPermutation(lsa=lsa).find(scores, pattern, name="g")
    assert perm.dtype == torch.long and is_permutation(perm, scores.shape[1])
    assert kept(scores, perm, pattern) >= kept(scores, torch.arange(scores.shape[1]), pattern)


def test_snake_reallocation_layout() -> None:
    # summed scores 15, 14, ..., 0 over the 16 channels: sorted order is 0, 1, ..., 15
    scores = torch.arange(16, 0, -1, dtype=torch.float32).repeat(3, 1)
    perm = snake_reallocation(scores, 4).view(4, 4)  # (groups, positions)
    assert perm[:, 0].tolist() == [0, 1, 2, 3]  # block 0 forward
    assert perm[:, 1].tolist() == [7, 6, 5, 4]  # block 1 reversed
    assert perm[:, 2].tolist() == [8, 9, 10, 11]
    assert perm[:, 3].tolist() == [15, 14, 13, 12]
    # every group gets exactly one channel of every importance quantile
    assert all(sorted(int(c) // 4 for c in row) == [0, 1, 2, 3] for row in perm)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_assignment_is_optimal_for_each_position(nm) -> None:
    """One position's assignment equals the LSA of brute-force kept scores."""
    n, m = nm
    pattern = NMPattern(n, m)
    scores = torch.rand(9, 5 * m, generator=torch.Generator().manual_seed(2)).double()
    perm = snake_reallocation(scores, m)
    groups = perm.view(-1, m)
    for p in range(m):
        brute = torch.zeros(5, 5, dtype=torch.float64)
        for k in range(5):
            for c in range(5):
                cols = groups[k].clone()
                cols[p] = groups[c, p]
                brute[k, c] = nm_kept_score(scores[:, cols], pattern)
        rows, cols = linear_sum_assignment(brute.numpy(), maximize=True)
        expected = perm.clone()
        expected.view(-1, m)[torch.as_tensor(rows), p] = groups[torch.as_tensor(cols), p]
        got = perm.clone()
        RIAChannelPermutation._assign_position(scores, got, n, m, p, torch.arange(5))
        assert torch.equal(got, expected)


def test_falls_back_to_identity_and_counts() -> None:
    # identity already keeps more here than the snake reallocation + assignment can reach
    scores = torch.tensor(
        [[0.0, 9.0, 5.0, 4.0, 0.0, 2.0, 6.0, 7.0], [9.0, 8.0, 0.0, 0.0, 8.0, 5.0, 0.0, 4.0]]
    )
    pattern = NMPattern(2, 4)
    unguarded = snake_reallocation(scores.double(), 4)
    for p in range(4):
        RIAChannelPermutation._assign_position(scores.double(), unguarded, 2, 4, p, torch.arange(2))
    assert kept(scores, unguarded, pattern) < kept(scores, torch.arange(8), pattern)  # the premise
    method = RIAChannelPermutation()
    assert torch.equal(method.find(scores, pattern), torch.arange(8))
    assert method.fallbacks == 1
    method.find(torch.rand(4, 8), pattern)
    assert method.fallbacks in (1, 2)


def test_improves_random_scores_and_blocks() -> None:
    scores = torch.rand(64, 128, generator=torch.Generator().manual_seed(0))
    pattern = NMPattern(2, 4)
    full = RIAChannelPermutation().find(scores, pattern)
    assert efficacy(scores, full, pattern) > 0.3
    blocked = RIAChannelPermutation(blocks=4, rounds=2).find(scores, pattern)
    assert is_permutation(blocked, 128) and efficacy(scores, blocked, pattern) > 0.0
    # the assignment step only ever helps the reallocation it starts from
    realloc = RIAChannelPermutation(lsa=False).find(scores, pattern)
    assert kept(scores, full, pattern) >= kept(scores, realloc, pattern)


def test_trivial_and_bad_inputs() -> None:
    assert torch.equal(RIAChannelPermutation().find(torch.rand(3, 8), NMPattern(4, 4)), torch.arange(8))
    assert torch.equal(RIAChannelPermutation().find(torch.rand(3, 4), NMPattern(2, 4)), torch.arange(4))
    with pytest.raises(ValueError, match=r"layers\.5\.up.*d_in=6.*M=4"):
        RIAChannelPermutation().find(torch.rand(3, 6), NMPattern(2, 4), name="layers.5.up")
    with pytest.raises(ValueError, match=r"layers\.5\.up.*2-D"):
        RIAChannelPermutation().find(torch.rand(2, 3, 8), NMPattern(2, 4), name="layers.5.up")
    with pytest.raises(ValueError, match=r"o_proj.*blocks=3.*2 groups"):
        RIAChannelPermutation(blocks=3).find(torch.rand(3, 8), NMPattern(2, 4), name="o_proj")
    with pytest.raises(ValueError, match="blocks"):
        RIAChannelPermutation(blocks=0)
