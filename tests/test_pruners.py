"""Pruners (magnitude, Wanda, RIA, SparseGPT): exact N:M masks, scores, permutations, ties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.sparsity import (
    LayerStats,
    MagnitudePruner,
    NMPattern,
    RIAPruner,
    SparseGPTPruner,
    WandaPruner,
    check_nm,
    nm_mask,
)

PATTERNS = [NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4), NMPattern(2, 8)]


def make_stats(x: torch.Tensor, hessian: bool = True) -> LayerStats:
    """Exact stats of a token matrix ``x`` (tokens x d_in), in float64."""
    x = x.double()
    return LayerStats(sq_sum=(x**2).sum(0), count=x.shape[0], hessian=x.T @ x if hessian else None)


def correlated_inputs(tokens: int, d_in: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated channels and uneven scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, d_in, generator=g, dtype=torch.float64)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    scale = torch.exp(torch.randn(d_in, generator=g, dtype=torch.float64))
    return (z @ (torch.eye(d_in, dtype=torch.float64) + 2 * mix)) * scale


def all_pruners() -> list:
    return [MagnitudePruner(), WandaPruner(), RIAPruner(), SparseGPTPruner(blocksize=8)]


# ----------------------------------------------------------------------------------- N:M masks
@settings(max_examples=40, deadline=None)
@given(
    pruner_idx=st.integers(0, 3),
    pattern=st.sampled_from(PATTERNS),
    d_out=st.integers(1, 6),
    n_groups=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    use_perm=st.booleans(),
)
def test_masks_are_exactly_nm(pruner_idx, pattern, d_out, n_groups, seed, use_perm):
    pruner = all_pruners()[pruner_idx]
    d_in = n_groups * 8  # a multiple of every M used
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g)
    stats = make_stats(torch.randn(4 * d_in, d_in, generator=g))
    perm = torch.randperm(d_in, generator=g) if use_perm else None
    result = pruner.prune(weight, stats, pattern, perm=perm, name="layer")
    assert result.mask.dtype == torch.bool and result.mask.shape == weight.shape
    order = perm if perm is not None else torch.arange(d_in)
    check_nm(result.mask[:, order], pattern, "layer", exact=True)
    if pruner.updates_weights:
        assert result.weight is not None and result.weight.shape == weight.shape
        assert (result.weight[~result.mask] == 0).all()
        check_nm(result.weight[:, order], pattern, "layer")
    else:
        assert result.weight is None


def test_class_flags():
    assert not MagnitudePruner.needs_stats and not MagnitudePruner.updates_weights
    assert WandaPruner.needs_stats and not WandaPruner.needs_hessian
    assert RIAPruner.needs_stats and not RIAPruner.needs_hessian
    assert SparseGPTPruner.needs_stats and SparseGPTPruner.needs_hessian and SparseGPTPruner.updates_weights


def test_pruner_configs_build_their_pruner():
    """conf/pruner/ is the one registry of pruners: each option builds its class, with overrides."""
    from pathlib import Path

    from conftest import compose_cfg
    from hydra.errors import MissingConfigException
    from hydra.utils import instantiate

    def build(*overrides):
        return instantiate(compose_cfg(list(overrides), Path("/tmp/x")).pruner.method)

    assert isinstance(build("pruner=magnitude"), MagnitudePruner)
    assert isinstance(build("pruner=wanda"), WandaPruner)
    assert build("pruner=ria", "pruner.method.a=0.25").a == 0.25
    assert build("pruner=sparsegpt", "pruner.method.blocksize=64").blocksize == 64
    with pytest.raises(MissingConfigException, match="obc"):
        build("pruner=obc")


@pytest.mark.parametrize("pruner", [WandaPruner(), RIAPruner(), SparseGPTPruner()])
def test_missing_stats_is_an_error(pruner):
    with pytest.raises(ValueError, match="calibration"):
        pruner.score(torch.randn(2, 4), None)


def test_stats_width_mismatch_is_an_error():
    stats = make_stats(torch.randn(10, 8))
    with pytest.raises(ValueError, match="d_in=4"):
        WandaPruner().score(torch.randn(2, 4), stats)


# ----------------------------------------------------------------------------------- scores
W_SMALL = torch.tensor([[1.0, -2.0, 0.5, 4.0], [-3.0, 1.0, 2.0, 0.0]])
NORM_SQ = torch.tensor([4.0, 1.0, 9.0, 0.25])  # ||X_j||^2 -> norms 2, 1, 3, 0.5


def test_magnitude_score_by_hand():
    assert torch.equal(MagnitudePruner().score(W_SMALL, None), W_SMALL.abs())


def test_wanda_score_by_hand():
    stats = LayerStats(sq_sum=NORM_SQ.double(), count=7)
    expected = torch.tensor([[2.0, 2.0, 1.5, 2.0], [6.0, 1.0, 6.0, 0.0]])
    torch.testing.assert_close(WandaPruner().score(W_SMALL, stats), expected)


def test_ria_score_by_hand():
    stats = LayerStats(sq_sum=NORM_SQ.double(), count=7)
    a = 0.5
    norms = [2.0, 1.0, 3.0, 0.5]
    w = W_SMALL.abs().tolist()
    expected = torch.zeros(2, 4)
    for i in range(2):
        row_sum = sum(w[i])
        for j in range(4):
            col_sum = w[0][j] + w[1][j]
            expected[i, j] = (w[i][j] / col_sum + w[i][j] / row_sum) * norms[j] ** a
    torch.testing.assert_close(RIAPruner(a=a).score(W_SMALL, stats), expected)


def test_ria_zero_column_is_finite():
    weight = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    stats = LayerStats(sq_sum=torch.ones(4, dtype=torch.float64), count=1)
    score = RIAPruner().score(weight, stats)
    assert torch.isfinite(score).all()
    assert score[1].abs().sum() == 0 and score[0, 0] == 0


def test_half_precision_weight_scores_in_float32():
    stats = LayerStats(sq_sum=NORM_SQ.double(), count=7)
    for pruner in (MagnitudePruner(), WandaPruner(), RIAPruner()):
        score = pruner.score(W_SMALL.half(), stats)
        assert score.dtype == torch.float32
        torch.testing.assert_close(score, pruner.score(W_SMALL, stats))


def test_sparsegpt_score_by_hand():
    x = correlated_inputs(64, 8, seed=3)
    stats = make_stats(x)
    weight = torch.randn(3, 8, dtype=torch.float64)
    h = 2 * x.T @ x / x.shape[0]
    h = h + 0.01 * h.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    expected = weight**2 / torch.linalg.inv(h).diagonal()
    score = SparseGPTPruner(dtype=torch.float64).score(weight, stats)
    torch.testing.assert_close(score, expected)
    # equivariant under channel permutations, so permutation search can use it
    perm = torch.randperm(8)
    pstats = LayerStats(sq_sum=stats.sq_sum[perm], count=stats.count, hessian=stats.hessian[perm][:, perm])
    torch.testing.assert_close(
        SparseGPTPruner(dtype=torch.float64).score(weight[:, perm], pstats), score[:, perm]
    )


def test_wanda_with_uniform_norms_equals_magnitude():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=g)
    stats = LayerStats(sq_sum=torch.full((32,), 9.0, dtype=torch.float64), count=5)
    torch.testing.assert_close(WandaPruner().score(weight, stats), 3 * MagnitudePruner().score(weight, None))
    for pattern in PATTERNS:
        assert torch.equal(
            WandaPruner().prune(weight, stats, pattern).mask,
            MagnitudePruner().prune(weight, None, pattern).mask,
        )


# ----------------------------------------------------------------------------------- permutations
@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner(), RIAPruner()])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_mask_with_perm_is_mask_of_permuted_scores_mapped_back(pruner, pattern):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 16, generator=g)
    stats = make_stats(torch.randn(40, 16, generator=g), hessian=False)
    perm = torch.randperm(16, generator=g)
    mask = pruner.prune(weight, stats, pattern, perm=perm).mask
    expected_perm = nm_mask(pruner.score(weight, stats)[:, perm], pattern)
    assert torch.equal(mask[:, perm], expected_perm)
    assert not torch.equal(mask, pruner.prune(weight, stats, pattern).mask)  # the perm matters here


# ----------------------------------------------------------------------------------- ties
@pytest.mark.parametrize("pattern", PATTERNS)
def test_ties_resolve_to_lower_index(pattern):
    weight = torch.full((3, 16), 0.5)
    stats = LayerStats(
        sq_sum=torch.full((16,), 4.0, dtype=torch.float64),
        count=4,
        hessian=torch.eye(16, dtype=torch.float64),
    )
    expected = (torch.arange(16) % pattern.m < pattern.n).expand(3, 16)
    for pruner in all_pruners():
        assert torch.equal(pruner.prune(weight, stats, pattern).mask, expected), type(pruner).__name__


# ----------------------------------------------------------------------------------- SparseGPT
def reference_sparsegpt_24(
    weight: torch.Tensor, xtx: torch.Tensor, n_tokens: int, blocksize: int
) -> torch.Tensor:
    """Literal port of IST-DASLab ``fasterprune`` for ``prunen=2, prunem=4`` (prunes the 2 smallest)."""
    W = weight.clone().double()
    H = 2 * xtx.clone().double() / n_tokens
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = 0.01 * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    prunen, prunem = 2, 4
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if i % prunem == 0:
                tmp = (
                    W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                )
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_sparsegpt_matches_reference_at_2_4():
    x = correlated_inputs(256, 32, seed=5)
    x[:, 7] = 0  # a dead channel
    stats = make_stats(x)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(12, 32, generator=g, dtype=torch.float64)
    ours = SparseGPTPruner(blocksize=16, dtype=torch.float64).prune(weight, stats, NMPattern(2, 4))
    ref = reference_sparsegpt_24(weight, stats.hessian, stats.count, blocksize=16)
    torch.testing.assert_close(ours.weight, ref)
    assert (ours.weight[:, 7] == 0).all()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparsegpt_reconstructs_better_than_wanda(pattern):
    x = correlated_inputs(512, 32, seed=11)
    stats = make_stats(x)
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(24, 32, generator=g, dtype=torch.float64)
    sgpt = SparseGPTPruner(blocksize=32, dtype=torch.float64).prune(weight, stats, pattern)
    wanda_mask = WandaPruner().prune(weight, stats, pattern).mask
    dense = x @ weight.T
    err_sgpt = (dense - x @ sgpt.weight.T).norm()
    err_wanda = (dense - x @ (weight * wanda_mask).T).norm()
    assert err_sgpt < err_wanda
    check_nm(sgpt.mask, pattern, exact=True)
    assert (sgpt.weight[~sgpt.mask] == 0).all()


def test_sparsegpt_perm_equals_pruning_the_permuted_layer():
    x = correlated_inputs(128, 16, seed=2)
    stats = make_stats(x)
    weight = torch.randn(6, 16, dtype=torch.float64)
    perm = torch.randperm(16)
    pruner = SparseGPTPruner(blocksize=8, dtype=torch.float64)
    with_perm = pruner.prune(weight, stats, NMPattern(2, 4), perm=perm)
    pstats = make_stats(x[:, perm])
    direct = pruner.prune(weight[:, perm], pstats, NMPattern(2, 4))
    assert torch.equal(with_perm.mask[:, perm], direct.mask)
    torch.testing.assert_close(with_perm.weight[:, perm], direct.weight)
    check_nm(with_perm.mask[:, perm], NMPattern(2, 4), exact=True)
    # the identity permutation changes nothing
    ident = pruner.prune(weight, stats, NMPattern(2, 4), perm=torch.arange(16))
    plain = pruner.prune(weight, stats, NMPattern(2, 4))
    assert torch.equal(ident.mask, plain.mask) and torch.equal(ident.weight, plain.weight)


def test_sparsegpt_float32_default_keeps_dtype_and_zeros():
    x = correlated_inputs(128, 16, seed=4).float()
    weight = torch.randn(5, 16).half()
    result = SparseGPTPruner(blocksize=16).prune(weight, make_stats(x), "4:8")
    assert result.weight.dtype == torch.float16
    assert (result.weight[~result.mask] == 0).all()
    assert torch.isfinite(result.weight).all()


def test_sparsegpt_blocksize_must_be_multiple_of_m():
    stats = make_stats(torch.randn(20, 16))
    with pytest.raises(ValueError, match="blocksize=6 must be a multiple of M=4"):
        SparseGPTPruner(blocksize=6).prune(torch.randn(2, 16), stats, NMPattern(2, 4), name="layer")


def test_sparsegpt_needs_hessian():
    stats = make_stats(torch.randn(20, 16), hessian=False)
    with pytest.raises(ValueError, match="hessian=True"):
        SparseGPTPruner().prune(torch.randn(2, 16), stats, NMPattern(2, 4))


def test_sparsegpt_bad_perm():
    stats = make_stats(torch.randn(20, 8))
    with pytest.raises(ValueError, match="permutation"):
        SparseGPTPruner(blocksize=8).prune(
            torch.randn(2, 8), stats, NMPattern(2, 4), perm=torch.zeros(8, dtype=torch.long)
        )


def test_d_in_not_divisible_names_layer():
    stats = make_stats(torch.randn(20, 6))
    for pruner in all_pruners():
        with pytest.raises(ValueError, match="blocks.0.fc1"):
            pruner.prune(torch.randn(2, 6), stats, NMPattern(2, 4), name="blocks.0.fc1")


def test_sparsegpt_rejects_non_finite_weight():
    weight = torch.randn(2, 8)
    weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SparseGPTPruner(blocksize=8).prune(
            weight, make_stats(torch.randn(20, 8)), NMPattern(2, 4), name="layer"
        )
