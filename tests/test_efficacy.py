"""Efficacy (Apex's metric) and kept-score ratio: identity, perfect permutation, hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from permsparse.permutation.efficacy import efficacy, kept_ratio, kept_scores
from permsparse.sparsity.nm import NMPattern

P24 = NMPattern(2, 4)


def test_identity_is_zero_and_ratio_one() -> None:
    scores = torch.rand(16, 32, generator=torch.Generator().manual_seed(0))
    identity = torch.arange(32)
    assert efficacy(scores, identity, P24) == 0.0
    assert kept_ratio(scores, identity, P24) == 1.0


def test_perfect_permutation_is_one() -> None:
    # columns 0-3 large, 4-7 small: identity keeps 2 large + 2 small per row, interleaving keeps the 4
    # large ones, which is exactly what unstructured row-wise pruning to 50 % keeps.
    scores = torch.tensor(
        [[9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 1.0, 1.0, 2.0, 2.0]]
    )
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    assert efficacy(scores, perm, P24) == pytest.approx(1.0)
    # identity keeps 17 + 7 and 15 + 4 = 43; permuted keeps 17 + 13 and 11 + 15 = 56
    assert kept_ratio(scores, perm, P24) == pytest.approx(56 / 43)


def test_hand_computed_2_4() -> None:
    scores = torch.tensor(
        [[9.0, 8.0, 7.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0, 9.0, 8.0, 7.0, 0.0]]
    )
    # identity keeps 17 + 1 and 1 + 17 = 36 of 50 (lost 14); row-wise keeps 25 + 25 = 50 (lost 0)
    perm = torch.tensor([0, 4, 1, 2, 5, 6, 3, 7])
    # row 0 -> [9, 0, 8, 7 | 0, 0, 0, 1] keeps 17 + 1; row 1 -> [0, 9, 0, 0 | 8, 7, 1, 0] keeps 9 + 15: 42
    assert kept_scores(scores, perm, P24) == {
        "total": 50.0,
        "identity": 36.0,
        "method": 42.0,
        "rowwise": 50.0,
    }
    assert efficacy(scores, perm, P24) == pytest.approx((14 - 8) / (14 - 0))
    assert kept_ratio(scores, perm, P24) == pytest.approx(42 / 36)


def test_hand_computed_1_4() -> None:
    p14 = NMPattern(1, 4)
    scores = torch.tensor([[6.0, 5.0, 4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0, 0.0]])
    # identity keeps 6 + 3 + 2 = 11; row-wise keeps the top 3: 6 + 5 + 4 = 15
    # swapping channels 1 and 4: [6, 3, 4, 0] [5, 0, 0, 0] [2, 1, 0, 0] keeps 6 + 5 + 2 = 13
    perm = torch.tensor([0, 4, 2, 3, 1, 5, 6, 7, 8, 9, 10, 11])
    assert efficacy(scores, perm, p14) == pytest.approx((13 - 11) / (15 - 11))
    assert kept_ratio(scores, perm, p14) == pytest.approx(13 / 11)


def test_degenerate_denominator() -> None:
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 8.0, 0.0, 0.0, 5.0]])
    # identity keeps 7 + 13 = 20 = the row-wise 8 + 5 + 4 + 3: nothing can be gained
    assert kept_scores(scores, torch.arange(8), P24)["rowwise"] == 20.0
    assert efficacy(scores, torch.arange(8), P24) == 0.0
    assert math.isnan(efficacy(scores, torch.arange(8), P24, degenerate=math.nan))
    assert efficacy(torch.rand(3, 8), torch.arange(8), NMPattern(4, 4)) == 0.0  # nothing pruned


def test_all_zero_scores() -> None:
    scores = torch.zeros(3, 8)
    assert efficacy(scores, torch.arange(8), P24) == 0.0
    assert kept_ratio(scores, torch.arange(8), P24) == 1.0


def test_bad_shapes_name_the_layer() -> None:
    with pytest.raises(ValueError, match=r"layers\.3\.down.*d_in=10.*M=4"):
        efficacy(torch.rand(4, 10), torch.arange(10), P24, name="layers.3.down")
    with pytest.raises(ValueError, match=r"layers\.3\.down.*permutation of range\(8\)"):
        efficacy(torch.rand(4, 8), torch.arange(7), P24, name="layers.3.down")
    with pytest.raises(ValueError, match=r"qkv.*permutation"):
        kept_ratio(torch.rand(4, 8), torch.zeros(8, dtype=torch.long), P24, name="qkv")
    with pytest.raises(ValueError, match="2-D"):
        efficacy(torch.rand(8), torch.arange(8), P24)
