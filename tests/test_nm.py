"""N:M masks: exact N:M, keep-N semantics, deterministic tie-break, clear errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.sparsity.nm import NMPattern, check_nm, is_nm, nm_kept_score, nm_mask

PATTERNS = [(2, 4), (4, 8), (1, 4), (2, 8), (1, 2), (3, 4)]


@settings(max_examples=60, deadline=None)
@given(
    nm=st.sampled_from(PATTERNS),
    rows=st.integers(1, 9),
    groups=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    quantised=st.booleans(),
)
def test_mask_is_exactly_nm_and_keeps_the_top_n(nm, rows, groups, seed, quantised):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, groups * m, generator=gen)
    if quantised:  # many exact ties, as in a dequantised 4-bit checkpoint
        scores = scores.round()
    mask = nm_mask(scores, f"{n}:{m}")
    assert mask.dtype == torch.bool
    assert is_nm(mask, NMPattern(n, m), exact=True)
    check_nm(mask, NMPattern(n, m), exact=True)
    grouped_scores = scores.reshape(rows, groups, m)
    grouped_mask = mask.reshape(rows, groups, m)
    kept_min = grouped_scores.masked_fill(~grouped_mask, float("inf")).amin(-1)
    dropped_max = grouped_scores.masked_fill(grouped_mask, float("-inf")).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert torch.isclose((scores * mask).sum(), nm_kept_score(scores, f"{n}:{m}"), atol=1e-4)


def test_ties_break_towards_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]])
    assert nm_mask(scores, "2:4").tolist() == [[True, True, False, False, False, True, True, False]]
    assert nm_mask(scores, "1:4").tolist() == [[True, False, False, False, False, True, False, False]]


def test_mask_is_deterministic_across_calls():
    scores = torch.randint(0, 3, (64, 128)).float()
    assert torch.equal(nm_mask(scores, "2:4"), nm_mask(scores.clone(), "2:4"))


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 4:8 ", (4, 8)), ("1/4", (1, 4))])
def test_pattern_parses(text, expected):
    p = NMPattern.parse(text)
    assert (p.n, p.m) == expected
    assert str(NMPattern(*expected)) == f"{expected[0]}:{expected[1]}"


@pytest.mark.parametrize("bad,needle", [("5:4", "N must not exceed M"), ("0:4", "N must be >= 1"),
                                        ("2:0", "M must be >= 1"), ("-1:4", "N must be >= 1"),
                                        ("2-4", "cannot parse"), ("two:four", "cannot parse"), ("", "cannot parse")])
def test_bad_patterns_raise_with_the_numbers(bad, needle):
    with pytest.raises(ValueError, match=needle):
        NMPattern.parse(bad)


def test_bad_shapes_name_the_layer_and_numbers():
    with pytest.raises(ValueError, match=r"blocks.0.fc1: d_in=10 is not divisible by M=4"):
        nm_mask(torch.rand(3, 10), "2:4", name="blocks.0.fc1")
    with pytest.raises(ValueError, match=r"fc: N:M sparsity needs a 2-D weight.*\(2, 3, 4\)"):
        nm_mask(torch.rand(2, 3, 4), "2:4", name="fc")
    with pytest.raises(ValueError, match="NaN"):
        nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), "2:4")


def test_validator_reports_the_first_bad_group():
    w = torch.ones(2, 8)
    w[:, 2:4] = 0
    w[:, 6:8] = 0
    check_nm(w, "2:4")
    w[1, 6] = 1.0
    with pytest.raises(ValueError, match=r"lin: not 2:4-sparse: row 1, input channels 4..7 hold 3 non-zeros"):
        check_nm(w, "2:4", name="lin")
    assert not is_nm(w, "2:4")
    # a weight may hold extra zeros: at most N passes unless exact is asked
    sparse = torch.zeros(2, 8)
    check_nm(sparse, "2:4")
    with pytest.raises(ValueError):
        check_nm(sparse, "2:4", exact=True)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (1, 2), (4, 16), (8, 16)])
@pytest.mark.parametrize("quantised", [False, True])
def test_pairwise_choice_equals_the_stable_sort_reference(nm, quantised):
    """The fast pairwise ranking (M <= 8) and the sort (larger M) both equal a stable descending sort."""
    from permsparse.sparsity.nm import _group_ranks, keep_top_n_planes

    n, m = nm
    scores = torch.randn(37, 12 * m, generator=torch.Generator().manual_seed(n * 100 + m))
    if quantised:
        scores = (scores * 1.5).round()  # many exact ties
    reference = _group_ranks(scores, m) < n
    assert torch.equal(nm_mask(scores, f"{n}:{m}"), reference)
    # the plane layout used by the learned method: planes[j] = position j of every group, any group order
    planes = scores.reshape(37, 12, m).permute(2, 1, 0).contiguous()  # (m, groups, rows)
    assert torch.equal(keep_top_n_planes(planes, n).permute(2, 1, 0).reshape(37, 12 * m), reference)
