"""Sinkhorn, Hungarian, straight-through estimator and the learnable cost module."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.permutation.apply import apply_block_matrix, apply_block_matrix_t, permuted_masked_weight
from permsparse.permutation.base import block_to_global, global_to_block, invert, is_permutation
from permsparse.permutation.cost import LearnableCost
from permsparse.permutation.hungarian import hungarian, perm_to_matrix, straight_through
from permsparse.permutation.schedule import TemperatureSchedule
from permsparse.permutation.sinkhorn import doubly_stochastic_residual, log_sinkhorn, sinkhorn
from permsparse.sparsity.nm import nm_mask


def test_sinkhorn_residual_falls_below_1e_3_with_enough_iterations():
    cost = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(0))
    few = doubly_stochastic_residual(sinkhorn(cost, tau=0.5, n_iters=1))
    many = doubly_stochastic_residual(sinkhorn(cost, tau=0.5, n_iters=200))
    assert many < 1e-3
    assert many < few


def test_sinkhorn_is_finite_at_low_temperature_with_large_costs():
    cost = 1e4 * torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    cost.requires_grad_(True)
    log_p = log_sinkhorn(cost, tau=1e-3, n_iters=50)
    assert torch.isfinite(log_p).all()
    log_p.exp().sum().backward()
    assert torch.isfinite(cost.grad).all()


def test_sinkhorn_is_differentiable_and_batched():
    cost = torch.randn(3, 8, 8, requires_grad=True)
    p = sinkhorn(cost, tau=1.0, n_iters=10, gumbel_scale=0.5, generator=torch.Generator().manual_seed(0))
    (p * torch.randn(3, 8, 8)).sum().backward()
    assert cost.grad is not None and torch.isfinite(cost.grad).all() and cost.grad.abs().sum() > 0
    # each group is normalised independently: scaling one group's cost leaves the others unchanged
    other = cost.detach().clone()
    other[0] *= 3
    a, b = sinkhorn(cost.detach(), 1.0, 10), sinkhorn(other, 1.0, 10)
    assert torch.allclose(a[1:], b[1:])


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="tau"):
        sinkhorn(torch.randn(3, 3), tau=0.0)


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_matches_brute_force(seed):
    g = 6
    scores = torch.randn(2, g, g, generator=torch.Generator().manual_seed(seed))
    perm = hungarian(scores)
    for k in range(2):
        best = max(itertools.permutations(range(g)), key=lambda p: sum(scores[k, p[j], j] for j in range(g)))
        got = sum(scores[k, perm[k, j], j] for j in range(g))
        assert torch.isclose(torch.as_tensor(got), torch.as_tensor(sum(scores[k, best[j], j] for j in range(g))))


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 4), size=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_hard_permutations_are_bijections(groups, size, seed):
    cost = torch.randn(groups, size, size, generator=torch.Generator().manual_seed(seed))
    perm = hungarian(sinkhorn(cost, 0.3, 5))
    assert is_permutation(perm, size)
    glob = block_to_global(perm)
    assert is_permutation(glob, groups * size)
    assert torch.equal(global_to_block(glob, groups), perm)
    assert torch.equal(invert(glob)[glob], torch.arange(groups * size))


def test_perm_matrix_matches_gather_and_its_transpose_undoes_it():
    perm = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    w = torch.randn(7, 15)
    p = perm_to_matrix(perm)
    assert torch.allclose(apply_block_matrix(w, p), w[:, block_to_global(perm)])
    assert torch.allclose(apply_block_matrix_t(apply_block_matrix(w, p), p), w)


def test_permuted_masked_weight_equals_mask_mapped_back():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=gen)
    local = torch.stack([torch.randperm(4, generator=gen) for _ in range(4)])
    perm = block_to_global(local)
    mask_perm = nm_mask(w.abs()[:, perm], "2:4")
    expected = w * mask_perm[:, invert(perm)]
    got = permuted_masked_weight(w, perm_to_matrix(local), mask_perm)
    assert torch.allclose(got, expected)


def test_straight_through_has_hard_value_and_soft_gradient():
    soft = torch.rand(2, 3, 3, requires_grad=True)
    hard = perm_to_matrix(hungarian(soft.detach()))
    out = straight_through(hard, soft)
    assert torch.allclose(out.detach(), hard, atol=1e-6)
    out.sum().backward()
    assert torch.equal(soft.grad, torch.ones_like(soft))


def test_learnable_cost_starts_at_identity_and_learns():
    cost = LearnableCost(16, groups=4, seed=0)
    p, perm = cost(tau=1.0)
    assert torch.equal(perm, torch.arange(4).expand(4, 4))
    assert torch.equal(cost.harden(), torch.arange(16))
    # normalised blocks: mean 0, std 1
    c = cost.cost()
    assert torch.allclose(c.mean((-2, -1)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(c.std((-2, -1)), torch.ones(4), atol=1e-3)
    # a loss that prefers the reversed order moves the hard permutation there
    target = perm_to_matrix(torch.arange(3, -1, -1).expand(4, 4))
    opt = torch.optim.Adam(cost.parameters(), lr=0.1)
    for _ in range(60):
        p, _ = cost(tau=0.5)
        loss = -(p * target).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(cost.harden(), block_to_global(torch.arange(3, -1, -1).expand(4, 4)))


def test_learnable_cost_can_start_from_a_given_permutation():
    start = block_to_global(torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(s)) for s in range(2)]))
    assert torch.equal(LearnableCost(16, groups=2, init=start).harden(), start)
    with pytest.raises(ValueError, match="not divisible"):
        LearnableCost(10, groups=4)


def test_soft_mode_returns_the_sinkhorn_matrix():
    cost = LearnableCost(8, groups=2)
    p, perm = cost(tau=1.0, hard=False)
    assert doubly_stochastic_residual(p) < 1e-2
    assert not torch.equal(p, perm_to_matrix(perm))


@pytest.mark.parametrize("kind", ["exponential", "linear", "cosine"])
def test_temperature_schedule_runs_from_start_to_end(kind):
    s = TemperatureSchedule(1.0, 0.05, 100, kind)
    assert s(0) == pytest.approx(1.0) and s(100) == pytest.approx(0.05) and s(1000) == pytest.approx(0.05)
    values = [s(i) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError, match="unknown temperature schedule"):
        TemperatureSchedule(kind="step")


def test_hungarian_shortcut_agrees_with_scipy_on_near_permutation_matrices():
    from scipy.optimize import linear_sum_assignment

    gen = torch.Generator().manual_seed(3)
    target = torch.stack([torch.randperm(12, generator=gen) for _ in range(5)])
    mats = perm_to_matrix(target, torch.float64) + 0.3 * torch.rand(5, 12, 12, generator=gen, dtype=torch.float64)
    mats[0] = torch.rand(12, 12, generator=gen, dtype=torch.float64)  # no shortcut for this one
    for maximize in (True, False):
        perm = hungarian(mats if maximize else -mats, maximize=maximize)
        for k in range(5):
            rows, cols = linear_sum_assignment(mats[k].numpy(), maximize=True)
            best = mats[k].numpy()[rows, cols].sum()
            assert float(mats[k][perm[k], torch.arange(12)].sum()) == pytest.approx(best)


def test_incremental_mask_update_equals_full_recompute():
    from permsparse.models.tiny import tiny_llama
    from permsparse.permutation.learned import LearnedPermutation, LearnedPermutations
    from permsparse.sparsity.pruners import MagnitudePruner

    model = tiny_llama(seed=0)
    # no base: the block-diagonal permutations set below are in the original channel order
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(groups=4, init_scale=1.0,
                                                                                              base="none")).attach()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        perms = {}
        for name in learned.group_names:
            d_in = learned.costs[name.replace(".", "__")].d_in
            local = torch.stack([torch.randperm(d_in // 4, generator=gen) for _ in range(4)])
            local[:2] = torch.arange(d_in // 4)  # half the groups keep their channels
            perms[name] = block_to_global(local)
        learned.set_permutations(perms)
        for name, state in learned._states.items():
            for linear, score_t in state.scores_t.items():
                score = score_t.T
                expected = nm_mask(score[:, perms[name]], "2:4")[:, torch.argsort(perms[name])].float()
                # the original-order mask the forward pass multiplies by, and the masked weight it gives
                assert torch.equal(state.masks_t[linear].T, expected)
                weight = model.get_submodule(linear).weight.detach()
                original = model.get_submodule(linear).parametrizations.weight.original
                assert torch.equal(weight, original * expected)
    learned.detach_model()


@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed-storage"])
@pytest.mark.parametrize("shape,groups", [((12, 16), 4), ((40, 48), 2)])
def test_hard_masked_weight_matches_the_dense_block_products_in_value_and_gradient(shape, groups, transposed):
    from permsparse.permutation.apply import hard_permuted_masked_weight

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen)
    size = shape[1] // groups
    cost = torch.randn(groups, size, size, generator=gen, requires_grad=True)
    upstream = torch.randn(*shape, generator=gen)
    local = hungarian(sinkhorn(cost.detach(), 0.5, 10))
    perm = block_to_global(local)
    mask = nm_mask(w.abs()[:, perm], "2:4")
    if transposed:  # the layout LearnedPermutations gives bound weights, and the gradient a linear hands back
        w, upstream = w.T.contiguous().T, upstream.T.contiguous().T
    grads, values = [], []
    for fn in (lambda p: permuted_masked_weight(w, p, mask), lambda p: hard_permuted_masked_weight(w, p, perm, mask)):
        p = straight_through(perm_to_matrix(local), sinkhorn(cost, 0.5, 10))
        out = fn(p)
        (out * upstream).sum().backward()
        values.append(out.detach())
        grads.append(cost.grad.clone())
        cost.grad = None
    assert torch.allclose(values[0], values[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert grads[0].abs().sum() > 0


def test_warm_started_sinkhorn_converges_in_few_iterations_when_the_cost_moves_little():
    from permsparse.permutation.sinkhorn import log_sinkhorn_warm

    gen = torch.Generator().manual_seed(0)
    cost = torch.randn(4, 64, 64, generator=gen)
    _, duals = log_sinkhorn_warm(cost, 0.5, 200)
    moved = cost + 0.01 * torch.randn(4, 64, 64, generator=gen)
    warm, _ = log_sinkhorn_warm(moved, 0.45, 3, duals)
    cold, _ = log_sinkhorn_warm(moved, 0.45, 3, None)
    reference = log_sinkhorn(moved, 0.45, 500)
    assert doubly_stochastic_residual(warm.exp()) < 0.2 * doubly_stochastic_residual(cold.exp())
    assert (warm.exp() - reference.exp()).abs().max() < (cold.exp() - reference.exp()).abs().max()


def test_warm_started_cost_module_tracks_residual_and_is_finite_at_low_temperature():
    cost = LearnableCost(32, groups=2, init_scale=0.05)
    for tau in [1.0, 0.5, 0.1, 1e-3]:
        p, perm = cost(tau, n_iters=20, warm_iters=3)
        assert torch.isfinite(p).all() and is_permutation(perm, 16)
        assert cost.last_residual == cost.last_residual  # not NaN
    assert bool(cost.warm)
    assert "row_potential" in cost.state_dict()


def test_block_standardisation_matches_the_composite_in_value_and_gradient():
    from permsparse.permutation.cost import standardize_blocks

    x = torch.randn(3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    std, mean = torch.std_mean(x, dim=(-2, -1), keepdim=True)
    reference = (x - mean) / (std + 1e-3)
    out = standardize_blocks(x, 1e-3)
    assert torch.allclose(out, reference, atol=1e-12)
    upstream = torch.randn(3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out, x, upstream)
    (expected,) = torch.autograd.grad(reference, x, upstream)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: standardize_blocks(t, 1e-3), (x,))
    # a constant block standardises to zeros with a finite gradient
    flat = torch.ones(1, 4, 4, dtype=torch.float64, requires_grad=True)
    standardize_blocks(flat).sum().backward()
    assert torch.isfinite(flat.grad).all()


@pytest.mark.parametrize("stack_limit", [None, 300])  # 300 entries: the two costs of 8 x 8 blocks get a stack each
@pytest.mark.parametrize("warm_iters", [None, 3])
def test_stacked_solve_equals_one_call_per_cost(warm_iters, stack_limit, monkeypatch):
    """``solve_costs`` stacks costs of equal block size; values, potentials and gradients match separate calls."""
    import permsparse.permutation.cost as cost_module
    from permsparse.permutation.cost import solve_costs

    if stack_limit:
        monkeypatch.setattr(cost_module, "_CPU_STACK_ELEMENTS", stack_limit)

    def make():
        return [LearnableCost(16, groups=4, seed=0, init_scale=0.05), LearnableCost(32, groups=4, seed=1),
                LearnableCost(24, groups=6, seed=2, tie=3), LearnableCost(16, groups=2, seed=3, init_scale=0.05)]

    separate, stacked = make(), make()
    gen = torch.Generator().manual_seed(0)
    for step, tau in enumerate([1.0, 0.5, 0.2]):  # the second and third calls are warm-started
        with torch.no_grad():
            for a, b in zip(separate, stacked, strict=True):
                noise = 0.3 * torch.randn(a.raw.shape, generator=gen)
                a.raw.add_(noise)
                b.raw.add_(noise)
        one = [c(tau, 20, warm_iters=warm_iters) for c in separate]
        many = solve_costs(stacked, tau, 20, warm_iters=warm_iters)
        weights = [torch.randn(p.shape, generator=gen) for p, _ in one]
        sum((p * w).sum() for (p, _), w in zip(one, weights, strict=True)).backward()
        sum((p * w).sum() for (p, _), w in zip(many, weights, strict=True)).backward()
        for a, b, (p1, perm1), (p2, perm2) in zip(separate, stacked, one, many, strict=True):
            assert torch.equal(perm1, perm2), step
            assert torch.allclose(p1, p2, atol=1e-6)
            assert torch.allclose(a.raw.grad, b.raw.grad, atol=1e-5, rtol=1e-4)
            assert torch.allclose(a.row_potential, b.row_potential, atol=1e-5)
            assert a.last_residual == pytest.approx(b.last_residual, abs=1e-6)
            assert p2.shape[0] == a.groups  # tied costs come back repeated


@pytest.mark.parametrize("solver", ["log_sinkhorn_warm", "sinkhorn_warm"], ids=["log-domain", "scaling-domain"])
def test_warm_started_sinkhorn_gradient_passes_gradcheck(solver):
    from permsparse.permutation import sinkhorn

    solve = getattr(sinkhorn, solver)
    gen = torch.Generator().manual_seed(0)
    cost = torch.randn(2, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    potentials = (torch.randn(2, 5, dtype=torch.float64, generator=gen), torch.randn(2, 5, dtype=torch.float64, generator=gen))
    assert torch.autograd.gradcheck(lambda c: solve(c, 0.7, 3, potentials)[0], (cost,))
    assert torch.autograd.gradcheck(lambda c: solve(c, 0.7, 3, None)[0], (cost,))


@pytest.mark.parametrize("warm", [True, False])
def test_scaling_domain_sinkhorn_equals_the_log_domain_in_value_potentials_and_gradient(warm):
    from permsparse.permutation.sinkhorn import log_sinkhorn_warm, sinkhorn_warm

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 24, 24, generator=gen)
    potentials = log_sinkhorn_warm(base, 0.3, 100)[1] if warm else None
    cost = (base + 0.1 * torch.randn(6, 24, 24, generator=gen)).requires_grad_(True)
    upstream = torch.randn(6, 24, 24, generator=gen)
    results = []
    for fn in (lambda c: (lambda r: (r[0].exp(), r[1]))(log_sinkhorn_warm(c, 0.3, 4, potentials)),
               lambda c: sinkhorn_warm(c, 0.3, 4, potentials)):
        p, (f, g) = fn(cost)
        (p * upstream).sum().backward()
        results.append((p.detach(), f, g, cost.grad.clone()))
        cost.grad = None
    (p_log, f_log, g_log, grad_log), (p_fast, f_fast, g_fast, grad_fast) = results
    assert torch.allclose(p_fast, p_log, atol=1e-6)
    assert torch.allclose(f_fast, f_log, atol=1e-5) and torch.allclose(g_fast, g_log, atol=1e-5)
    assert torch.allclose(grad_fast, grad_log, rtol=1e-4, atol=1e-6)
    assert grad_log.abs().sum() > 0


def test_scaling_domain_sinkhorn_falls_back_to_the_log_domain_when_a_column_underflows():
    from permsparse.permutation.sinkhorn import doubly_stochastic_residual, log_sinkhorn_warm, sinkhorn_warm

    # column 0 is 200 cost units worse than every row's best entry: at tau 1 its exp underflows in float32
    cost = torch.zeros(1, 4, 4)
    cost[0, :, 0] = 200.0
    p, _ = sinkhorn_warm(cost, 1.0, 50)
    assert torch.isfinite(p).all()
    assert torch.allclose(p, log_sinkhorn_warm(cost, 1.0, 50)[0].exp())
    assert doubly_stochastic_residual(p) < 1e-3
