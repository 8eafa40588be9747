"""The learned permutation: gradients reach only the costs, the loss falls, the teacher is the dense model."""

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from permsparse.lit import CausalLMModule, PermutationLearning
from permsparse.models.tiny import tiny_llama
from permsparse.permutation.learned import LearnedPermutation, LearnedPermutations
from permsparse.sparsity.pruners import MagnitudePruner


@pytest.fixture
def shallow_greedy(monkeypatch):
    """``init`` / ``base`` = greedy build greedy CP without its perturbation phase (as ``compose_cfg`` does for
    ``perm=greedy``): on the tiny model the phase took about 50 s per build and these tests need a greedy start,
    not the deepest one (``tests/test_channel_swap.py`` tests the phase)."""
    import permsparse.permutation.learned as learned_mod
    from permsparse.permutation.channel_swap import GreedyChannelSwap

    heuristic = learned_mod._heuristic
    monkeypatch.setattr(learned_mod, "_heuristic", lambda init, seed: GreedyChannelSwap(
        seed=seed, perturb_rounds_per_group=0) if init == "greedy" else heuristic(init, seed))


def _data(n=16, seq=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seq), generator=gen)


def test_only_the_costs_receive_gradients_and_dense_mode_is_the_teacher():
    model = tiny_llama(seed=0)
    ids = _data(2)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(groups=4, init_scale=1.0)).attach()
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(c.raw.grad is not None and c.raw.grad.abs().sum() > 0 for c in learned.costs.values())
    with torch.no_grad(), learned.dense():
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-6)
    bound = [model.get_submodule(name) for group in learned.binding for name in group.linears]
    assert all(m.parametrizations.weight.original.T.is_contiguous() for m in bound)  # attach's transposed storage
    learned.detach_model()
    assert all(m.weight.is_contiguous() for m in bound)  # the ordinary layout is back
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-6)


def test_learning_lowers_the_loss_on_a_tiny_model():
    """Fit the costs on a fixed batch from the identity start: the best hardened permutation beats the
    identity's loss."""
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    data = _data(8)
    module = CausalLMModule(model, optimizer=functools.partial(torch.optim.AdamW, lr=0.05), alpha=1e-5)
    callback = PermutationLearning(LearnedPermutation(groups=2, init="identity", base="none", init_scale=0.05, tau_start=1.0, tau_end=0.1, warm_iters=None), MagnitudePruner(), "2:4")
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(max_steps=30, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.validate(module, loader, verbose=False)
    trainer.fit(module, loader, loader)
    losses = [h["val_loss"] for h in callback.history]
    assert callback.history[0]["step"] == 0 and callback.history[0]["changed_channels"] == 0
    assert min(losses[1:]) < losses[0] - 1e-3, losses
    assert callback.best_loss == min(losses)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in callback.final_perms.values())


def test_a_non_finite_loss_skips_the_step_and_too_many_abort():
    model = tiny_llama(seed=0)
    module = CausalLMModule(model, alpha=0.0, max_nonfinite=3)
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(groups=2, init_scale=1.0)).attach()
    module.permutations = learned
    module.log = lambda *a, **k: None  # outside a Trainer
    module.task_loss = lambda output, batch: torch.tensor(float("nan"))
    batch = _data(2)
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert module.training_step(batch, 0) is None
        assert module.training_step(batch, 1) is None
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        module.training_step(batch, 2)


@pytest.mark.parametrize("grad_precision", ["float32", "bfloat16"])
def test_cost_gradients_equal_the_plain_straight_through_formula(grad_precision):
    """The fast path (stacked Sinkhorn, original-order masks, the Sinkhorn matrix carrying the straight-through
    gradient) gives the costs the gradient of docs/method.md §4.4 written out plainly:
    ``W_eff = ((W P) * M(P)) P^T`` with ``P = P_hard + P_soft - P_soft.detach()``, by dense block products."""
    import copy

    from torch.func import functional_call

    from permsparse.permutation.apply import permuted_masked_weight
    from permsparse.permutation.base import block_to_global
    from permsparse.permutation.hungarian import hungarian, perm_to_matrix, straight_through
    from permsparse.permutation.sinkhorn import log_sinkhorn
    from permsparse.sparsity.nm import nm_mask

    model = tiny_llama(seed=0)
    reference_model = copy.deepcopy(model)
    ids = _data(2)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))

    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(groups=4, grad_precision=grad_precision, init_scale=1.0, base="none",
                                                                                      mask_grad=False)).attach()
    assert learned.grad_dtype == getattr(torch, grad_precision)
    with torch.no_grad():  # away from the identity, so permutations and masks are not trivial
        for index, cost in enumerate(learned.costs.values()):
            cost.raw.add_(0.7 * torch.randn(cost.raw.shape, generator=torch.Generator().manual_seed(index)))
    learned.refresh(tau=0.5, hard=True, n_iters=20)
    loss_of(model(input_ids=ids).logits).backward()

    weights, raws = {}, {}
    for group in learned.binding:
        cost = learned.costs[group.name.replace(".", "__")]
        raws[group.name] = raw = cost.raw.detach().clone().requires_grad_(True)
        std, mean = torch.std_mean(raw, dim=(-2, -1), keepdim=True)
        soft = log_sinkhorn((raw - mean) / (std + cost.eps), 0.5, 20).exp()
        local = hungarian(soft.detach())
        p = straight_through(perm_to_matrix(local), soft)
        perm = block_to_global(local)
        assert torch.equal(perm, learned.current_permutations()[group.name])
        assert not torch.equal(perm, torch.arange(perm.numel()))
        for name in group.linears:
            weight = reference_model.get_submodule(name).weight.detach()
            weights[f"{name}.weight"] = permuted_masked_weight(weight, p, nm_mask(weight.abs()[:, perm], "2:4"))
    loss_of(functional_call(reference_model, weights, kwargs={"input_ids": ids}).logits).backward()
    for group in learned.binding:
        fast = learned.costs[group.name.replace(".", "__")].raw.grad
        assert fast.abs().sum() > 0
        if grad_precision == "float32":
            assert torch.allclose(fast, raws[group.name].grad, rtol=1e-4, atol=1e-6), group.name
        else:  # one bf16 rounding of the P-gradient (~0.4 % per entry); dropping either product errs by O(1)
            error = (fast - raws[group.name].grad).norm() / raws[group.name].grad.norm()
            assert error < 2e-2, (group.name, float(error))


def test_grad_precision_is_checked_and_auto_resolves_on_attach():
    from permsparse.permutation.apply import (
        gradient_workspace,
        hard_permuted_masked_weight,
        native_bf16_matmul,
    )

    with pytest.raises(ValueError, match="grad_precision='fp8' is invalid"):
        LearnedPermutations(tiny_llama(seed=0), MagnitudePruner(), "2:4", method=LearnedPermutation(grad_precision="fp8", init_scale=1.0))
    learned = LearnedPermutations(tiny_llama(seed=0), MagnitudePruner(), "2:4", method=LearnedPermutation(groups=4, init_scale=1.0))
    assert learned.grad_dtype is None  # not resolved before attach
    learned.attach()
    assert learned.grad_dtype == (torch.bfloat16 if native_bf16_matmul("cpu") else torch.float32)
    learned.detach_model()
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match="does not fit"):
        hard_permuted_masked_weight(weight, torch.eye(4).expand(4, 4, 4), torch.arange(16),
                                    mask_original=torch.ones(8, 16), workspace=gradient_workspace(weight, 2))


def test_scores_masks_and_workspaces_follow_the_module_to_another_device(monkeypatch):
    """Lightning builds the permutations on the CPU in the callback's setup and moves the LightningModule to the
    accelerator afterwards: the per-group scores and masks (not buffers) and the gradient workspaces must follow.
    The meta device stands in for an accelerator here."""
    import permsparse.permutation.learned as learned_module

    monkeypatch.setattr(learned_module, "native_bf16_matmul", lambda device: torch.device(device).type == "cpu")
    learned = LearnedPermutations(tiny_llama(seed=0), MagnitudePruner(), "2:4", method=LearnedPermutation(groups=4, init_scale=1.0)).attach()
    assert learned.grad_dtype == torch.bfloat16
    assert all(masked.workspace is not None for masked, _, _ in learned._masked)
    learned.to("meta")
    for state in learned._states.values():
        tensors = [*state.scores_t.values(), *state.masks_t.values(), state.perm]
        assert all(t.device.type == "meta" for t in tensors)
    # auto re-chooses for the new device: no native bf16 there, so float32 and no workspaces
    assert learned.grad_dtype == torch.float32
    assert all(masked.workspace is None for masked, _, _ in learned._masked)


@pytest.mark.parametrize("init", ["ria", "greedy"])
def test_a_heuristic_init_starts_at_the_heuristic_run_inside_each_block(init, shallow_greedy):
    from permsparse.models import get_spec
    from permsparse.permutation.base import find_block_diagonal
    from permsparse.permutation.channel_swap import GreedyChannelSwap
    from permsparse.permutation.efficacy import kept_scores
    from permsparse.permutation.ria_cp import RIAChannelPermutation
    from permsparse.prune import group_scores

    model = tiny_llama(seed=0)
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(groups=2, init=init, base="none"))
    start = learned.hard_permutations()
    heuristic = RIAChannelPermutation() if init == "ria" else GreedyChannelSwap(seed=0, perturb_rounds_per_group=0)
    moved = 0
    for group in get_spec(model).groups(model):
        scores = group_scores(model, group, MagnitudePruner(), None)
        expected = find_block_diagonal(heuristic, scores, "2:4", 2, group.name)
        assert torch.equal(start[group.name], expected), group.name
        d_in = scores.shape[1]
        assert (expected[: d_in // 2] < d_in // 2).all()  # block-diagonal: no channel leaves its block
        kept = kept_scores(scores, expected, "2:4")
        assert kept["method"] >= kept["identity"] * (1 - 1e-6)  # the heuristic never keeps less than no permutation
        moved += int((expected != torch.arange(d_in)).sum())
    assert moved > 0


def test_a_learned_run_from_greedy_validates_the_start_and_never_ends_worse(tmp_path, shallow_greedy):
    from conftest import TINY_LM, compose_cfg

    from permsparse.run import train

    results = train(compose_cfg([*TINY_LM, "perm.method.groups=2", "perm.method.init=greedy"], tmp_path))
    history = results["learning"]["history"]
    assert history[0]["step"] == 0 and history[0]["changed_channels"] > 0  # the start is the heuristic's
    assert results["learning"]["best_val_loss"] <= history[0]["val_loss"]


def test_the_kept_score_term_is_the_masks_kept_score_and_its_gradient_moves_saliency_into_kept_positions():
    from permsparse.models import get_spec
    from permsparse.prune import group_scores
    from permsparse.sparsity.nm import nm_kept_score

    model = tiny_llama(seed=0)
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4",
                                  method=LearnedPermutation(groups=2, init_scale=1.0, kept_weight=1.0)).attach()
    perms = learned.current_permutations()
    for group in get_spec(model).groups(model):  # exact: the N:M kept score of the permuted scores
        scores = group_scores(model, group, MagnitudePruner(), None)
        expected = nm_kept_score(scores[:, perms[group.name]], "2:4")
        assert torch.allclose(learned._kept(learned._states[group.name], exact=True), expected, rtol=1e-5)
    assert learned.regularizer() is not None and learned.regularizer().requires_grad
    learned.regularizer().backward()
    assert all(c.raw.grad is not None and c.raw.grad.abs().sum() > 0 for c in learned.costs.values())


def _kept_after_steps(kept_weight: float, steps: int = 8) -> float:
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(
        groups=2, init_scale=0.05, kept_weight=kept_weight, warm_iters=None)).attach()
    opt = torch.optim.Adam(learned.parameters(), lr=0.05)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        learned.refresh(tau=1.0 * 0.7**step, hard=True)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 128),
                                                 ids[:, 1:].reshape(-1))
        extra = learned.regularizer()
        opt.zero_grad()
        (loss if extra is None else loss + extra).backward()
        opt.step()
    learned.set_permutations(learned.hard_permutations())
    return float(sum(learned._kept(state, exact=True) for state in learned._states.values()))


@pytest.mark.parametrize("base", ["none", "ria"])
def test_with_the_mask_gradient_the_kept_score_term_is_differentiated_through_the_soft_top_n_too(base):
    """mask_grad: the term's gradient to P equals autograd of K = sum (S P) * (M_hard + M_soft - M_soft.detach()),
    M_soft = N softmax(S P / t) per M-group, written out densely; the value stays the hard kept score. Without
    mask_grad it is the constant-mask gradient, which differs."""
    from permsparse.sparsity.nm import nm_mask

    def term(mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, object, object]:
        model = tiny_llama(seed=0)
        learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(
            groups=2, init_scale=1.0, kept_weight=1.0, mask_grad=mask_grad, base=base)).attach()
        learned.refresh(tau=0.5, hard=True)
        state = next(iter(learned._states.values()))
        state.p.retain_grad()
        value = learned._kept(state)
        value.backward()
        return value.detach(), state.p.grad, state.p.detach(), state, learned

    value, grad, p, state, learned = term(mask_grad=True)
    pd = torch.block_diag(*p).requires_grad_(True)
    expected = torch.zeros(())
    for name, score_t in state.scores_t.items():
        frame = score_t.T if state.base is None else score_t.T[:, state.base]  # (d_out, d_in) in the frame's order
        sp = frame @ pd
        t = learned.method.mask_tau * state.mean_score[name]
        hard = nm_mask(sp.detach(), "2:4").to(sp.dtype)
        soft = 2 * (sp.reshape(sp.shape[0], -1, 4) / t).softmax(-1).reshape(sp.shape)
        expected = expected + (sp * (hard + soft - soft.detach())).sum()
    expected.backward()
    g = p.shape[1]
    blocks = torch.stack([pd.grad[b * g:(b + 1) * g, b * g:(b + 1) * g] for b in range(p.shape[0])])
    assert torch.allclose(value, expected.detach(), rtol=1e-5)  # the hard kept score
    assert torch.allclose(grad, blocks, rtol=1e-4, atol=1e-4 * blocks.abs().max()), (grad - blocks).abs().max()
    constant = term(mask_grad=False)[1]
    assert not torch.allclose(grad, constant, atol=1e-3 * blocks.abs().max())  # the mask path adds a gradient


def test_a_heavy_kept_score_term_keeps_more_score_than_none():
    assert _kept_after_steps(kept_weight=100.0) > _kept_after_steps(kept_weight=0.0)


@pytest.mark.parametrize("distill", ["block_smooth_l1", "final_cosine", "logits_kl"])
def test_every_distillation_term_is_zero_for_the_dense_student_and_positive_for_a_sparse_one(distill):
    model = tiny_llama(seed=0)
    module = CausalLMModule(model, alpha=1.0, distill=distill)
    module.permutations = LearnedPermutations(model, MagnitudePruner(), "2:4",
                                              method=LearnedPermutation(groups=2)).attach()
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with module.permutations.dense():  # student == teacher
        _, _, zero = module._distill_and_task(batch)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)
    loss, task, distill_term = module._distill_and_task(batch)
    assert float(distill_term) > 1e-6 and torch.isfinite(loss)
    loss.backward()
    assert any(c.raw.grad is not None and c.raw.grad.abs().sum() > 0 for c in module.permutations.costs.values())


def test_an_unknown_distillation_term_is_a_config_error():
    from permsparse.errors import ConfigError

    with pytest.raises(ConfigError, match="perm.distill='mse' is invalid"):
        CausalLMModule(tiny_llama(seed=0), distill="mse")


def test_the_soft_mask_gradient_equals_autograd_through_a_straight_through_soft_top_n():
    """dL/dP of ((W P) * M) P^T with M = M_hard + M_soft - M_soft.detach(), M_soft = N softmax(S P / t) per M-group,
    written out densely with autograd, equals the fused estimate (hard part + soft_mask_gradient)."""
    from permsparse.permutation.apply import hard_permuted_masked_weight, soft_mask_gradient
    from permsparse.permutation.base import block_to_global
    from permsparse.permutation.hungarian import perm_to_matrix
    from permsparse.sparsity.nm import nm_mask

    gen = torch.Generator().manual_seed(0)
    d_out, groups, size, n, m, t = 6, 2, 8, 2, 4, 0.3
    weight, scores = torch.randn(d_out, groups * size, generator=gen), torch.rand(d_out, groups * size, generator=gen)
    local = torch.stack([torch.randperm(size, generator=gen) for _ in range(groups)])
    perm = block_to_global(local)
    upstream = torch.randn(d_out, groups * size, generator=gen)

    p = perm_to_matrix(local, torch.float32).requires_grad_(True)  # (G, g, g)
    dense_p = torch.block_diag(*p)
    sp = scores @ dense_p
    hard = nm_mask(sp.detach(), f"{n}:{m}").float()
    soft = n * (sp.reshape(d_out, -1, m) / t).softmax(-1).reshape(d_out, -1)
    w_eff = ((weight @ dense_p) * (hard + soft - soft.detach())) @ dense_p.T
    (w_eff * upstream).sum().backward()
    expected = p.grad.clone()

    p.grad = None
    fused = hard_permuted_masked_weight(weight, p, perm, mask_permuted=hard)
    fused = soft_mask_gradient(fused, p, weight, scores, perm, n, m, t)
    assert torch.allclose(fused, w_eff.detach(), atol=1e-6)
    (fused * upstream).sum().backward()
    assert torch.allclose(p.grad, expected, atol=1e-5), (p.grad - expected).abs().max()
    p.grad = None
    (hard_permuted_masked_weight(weight, p, perm, mask_permuted=hard) * upstream).sum().backward()
    assert not torch.allclose(p.grad, expected, atol=1e-3)  # the mask path carries a gradient of its own


def test_a_learned_run_with_the_mask_gradient_lowers_its_loss(tmp_path):
    from conftest import TINY_LM, compose_cfg

    from permsparse.run import train

    # from the identity start (what the test measured before RIA became the default start)
    results = train(compose_cfg([*TINY_LM, "perm.method.groups=2", "perm.method.mask_grad=true",
                                 "perm.method.init=identity", "perm.method.base=none", "perm.method.init_scale=0.05",
                                 "learning.train_samples=16", "learning.val_every_n_steps=2"], tmp_path))
    history = results["learning"]["history"]
    assert results["learning"]["best_val_loss"] < history[0]["val_loss"]


def test_perm_permllm_runs_end_to_end_on_the_shared_machinery(tmp_path):
    from conftest import TINY_LM, compose_cfg

    from permsparse.run import train

    cfg = compose_cfg([*TINY_LM, "perm=permllm", "perm.method.block_size=32"], tmp_path)
    assert (cfg.perm.distill, cfg.perm.task_weight, cfg.perm.method.mask_grad) == ("final_cosine", 0.0, True)
    results = train(cfg)
    assert results["perm"] == "permllm" and results["learning"]["steps"] > 0
    assert results["learning"]["best_val_loss"] <= results["learning"]["history"][0]["val_loss"]


def test_under_a_base_frame_the_gradients_are_those_of_the_same_blocks_on_frame_ordered_tensors():
    """``base``: the fused hard gradient (with and without the bf16 workspace) and the soft-mask gradient on the
    original tensors equal the frame-free functions run on tensors whose channels are put in the base's order."""
    from permsparse.permutation.apply import (
        gradient_workspace,
        hard_permuted_masked_weight,
        soft_mask_gradient,
    )
    from permsparse.permutation.base import block_to_global
    from permsparse.permutation.hungarian import perm_to_matrix
    from permsparse.sparsity.nm import nm_mask

    gen = torch.Generator().manual_seed(1)
    d_out, groups, size, n, m, t = 6, 2, 8, 2, 4, 0.3
    d_in = groups * size
    weight, scores = torch.randn(d_out, d_in, generator=gen), torch.rand(d_out, d_in, generator=gen)
    base = torch.randperm(d_in, generator=gen)  # a global permutation: the blocks are runs of its order
    local = block_to_global(torch.stack([torch.randperm(size, generator=gen) for _ in range(groups)]))
    whole = base[local]
    assert not (whole.reshape(groups, size) // size == torch.arange(groups).unsqueeze(1)).all()  # not block-diagonal
    upstream = torch.randn(d_out, d_in, generator=gen)
    mask_permuted = nm_mask(scores[:, whole], f"{n}:{m}").float()

    def grads(w, s, u, frame, workspace=None):
        p = perm_to_matrix(local.reshape(groups, size) - torch.arange(groups).unsqueeze(1) * size,
                           torch.float32).requires_grad_(True)
        out = hard_permuted_masked_weight(w, p, local, mask_permuted=mask_permuted, base=frame, workspace=workspace)
        out = soft_mask_gradient(out, p, w, s, local if frame is None else whole, n, m, t, base=frame)
        (out * u).sum().backward()
        return out.detach(), p.grad

    out, grad = grads(weight, scores, upstream, base)
    frame_out, frame_grad = grads(weight[:, base], scores[:, base], upstream[:, base], None)
    assert torch.equal(out, weight * torch.empty_like(mask_permuted).index_copy_(1, whole, mask_permuted))
    assert torch.allclose(out[:, base], frame_out)
    assert torch.allclose(grad, frame_grad, atol=1e-5)
    assert grad.abs().sum() > 0
    workspace = gradient_workspace(weight, groups, torch.bfloat16, base=base)
    _, bf16_grad = grads(weight, scores, upstream, base, workspace)
    assert (bf16_grad - frame_grad).norm() / frame_grad.norm() < 2e-2


@pytest.mark.parametrize("base", ["ria", "greedy"])
def test_a_base_with_the_identity_start_begins_exactly_at_the_global_heuristic_and_learns_on_top(base, shallow_greedy):
    from permsparse.models import get_spec
    from permsparse.permutation.channel_swap import GreedyChannelSwap
    from permsparse.permutation.ria_cp import RIAChannelPermutation
    from permsparse.prune import group_scores

    model = tiny_llama(seed=0)
    method = LearnedPermutation(groups=2, base=base, init="identity", init_scale=0.05)
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=method)
    start = learned.hard_permutations()
    heuristic = RIAChannelPermutation() if base == "ria" else GreedyChannelSwap(seed=0, perturb_rounds_per_group=0)
    crossing = 0
    for group in get_spec(model).groups(model):
        expected = heuristic.find(group_scores(model, group, MagnitudePruner(), None), "2:4", group.name)
        assert torch.equal(start[group.name], expected), group.name
        d_in = expected.numel()
        crossing += int((expected[: d_in // 2] >= d_in // 2).sum())  # channels a block-diagonal start cannot move
    assert crossing > 0
    learned.attach()
    assert all(torch.equal(learned.current_permutations()[k], v) for k, v in start.items())  # attach's first step
    ids = _data(4)
    with torch.no_grad():  # away from the start, then a full hard step: masks follow the whole permutation
        for index, cost in enumerate(learned.costs.values()):
            cost.raw.add_(2.0 * torch.randn(cost.raw.shape, generator=torch.Generator().manual_seed(index)))
    learned.refresh(tau=0.5, hard=True)
    current = learned.current_permutations()
    model(input_ids=ids).logits.sum().backward()
    assert all(cost.raw.grad is not None and cost.raw.grad.abs().sum() > 0 for cost in learned.costs.values())
    for state in learned._states.values():
        name = state.group.name
        assert torch.equal(current[name], state.base[state.local])
        # the blocks are runs of the base's order: each block keeps its set of channels
        blocks = state.base.reshape(2, -1)
        assert all(set(current[name].reshape(2, -1)[b].tolist()) == set(blocks[b].tolist()) for b in range(2))
        for linear in state.group.linears:
            score_t = state.scores_t[linear]
            mask_t = state.masks_t[linear]
            expected = torch.empty_like(mask_t).index_copy_(
                0, current[name], nm_mask_t(score_t.index_select(0, current[name]), 2, 4).to(mask_t.dtype))
            assert torch.equal(mask_t, expected), linear
    learned.set_permutations(learned.hard_permutations())  # original indices round-trip through the frame
    assert all(torch.equal(learned.current_permutations()[k], v) for k, v in learned.hard_permutations().items())


def nm_mask_t(score_t, n, m):
    """The N:M mask of transposed scores ``(d_in, d_out)`` (groups of M consecutive rows)."""
    from permsparse.sparsity.nm import nm_mask

    return nm_mask(score_t.T, f"{n}:{m}").T


def test_an_unknown_base_is_a_config_error_naming_it():
    from permsparse.errors import ConfigError

    with pytest.raises(ConfigError, match="base"):
        LearnedPermutation(base="sorted")


def test_under_a_base_a_given_start_is_the_frame_and_learning_begins_exactly_at_it():
    """A mapping init need not be block-diagonal under a base: each group's permutation becomes its frame (how the
    end-to-end pass starts from block-local learning's result), the start is that permutation, and the first
    steps move channels only within runs of its order."""
    from permsparse.models import get_spec

    model = tiny_llama(seed=0)
    gen = torch.Generator().manual_seed(0)
    sizes = {g.name: model.get_submodule(g.linears[0]).in_features for g in get_spec(model).groups(model)}
    init = {name: torch.randperm(d_in, generator=gen) for name, d_in in sizes.items()}
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(groups=2, init=init))
    start = learned.hard_permutations()
    assert all(torch.equal(start[name], init[name]) for name in init)
    learned.attach()
    with torch.no_grad():
        for index, cost in enumerate(learned.costs.values()):
            cost.raw.add_(2.0 * torch.randn(cost.raw.shape, generator=torch.Generator().manual_seed(index)))
    moved = learned.hard_permutations()
    for name, perm in moved.items():
        half = sizes[name] // 2
        assert not torch.equal(perm, init[name]), name
        # position i of the frame keeps a channel of the same block of the frame's order
        assert set(perm[:half].tolist()) == set(init[name][:half].tolist()), name
    learned.detach_model()
    with pytest.raises(ValueError, match="not a permutation"):
        bad = dict(init, **{next(iter(init)): torch.zeros(sizes[next(iter(init))], dtype=torch.long)})
        LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(groups=2, init=bad))


def test_under_a_base_the_soft_mode_with_a_permutation_matrix_computes_the_hard_masked_weight():
    from permsparse.permutation.base import global_to_block
    from permsparse.permutation.hungarian import perm_to_matrix

    model = tiny_llama(seed=0)
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=LearnedPermutation(groups=2, base="ria"))
    learned.attach()
    with torch.no_grad():
        for index, cost in enumerate(learned.costs.values()):
            cost.raw.add_(2.0 * torch.randn(cost.raw.shape, generator=torch.Generator().manual_seed(index)))
    learned.refresh(tau=0.5, hard=True)
    hard = {name: model.get_submodule(name).weight.detach().clone() for s in learned._states.values()
            for name in s.group.linears}
    for state in learned._states.values():
        p = perm_to_matrix(global_to_block(state.local, state.p.shape[0])).requires_grad_(True)
        learned._set(state, p, state.local, soft=True)
    ids = _data(2)
    model(input_ids=ids).logits.sum().backward()
    for name, weight in hard.items():
        assert torch.allclose(model.get_submodule(name).weight, weight), name
    assert all(state.p.grad is not None and state.p.grad.abs().sum() > 0 for state in learned._states.values())


def test_with_foldable_a_base_leaves_the_head_restricted_groups_in_their_order_and_frames_the_others():
    from permsparse.permutation.foldable import is_foldable, is_head_restricted

    model = tiny_llama(seed=0)
    method = LearnedPermutation(groups=2, base="ria", init="identity", foldable=True)
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", method=method)
    perms = learned.hard_permutations()
    kinds = {is_head_restricted(state.group): state.base is None for state in learned._states.values()}
    assert kinds == {True: True, False: False}  # heads: no base; the rest: framed
    assert all(is_foldable(state.group, perms[name])[0]
               for name, state in learned._states.items() if is_head_restricted(state.group))


def test_a_learned_run_on_a_base_validates_the_global_heuristic_first_and_never_ends_worse(tmp_path):
    from conftest import TINY_LM, compose_cfg

    from permsparse.run import train

    results = train(compose_cfg([*TINY_LM, "perm.method.groups=2", "perm.method.base=ria",
                                 "perm.method.init=identity", "perm.method.init_scale=0.25"], tmp_path))
    history = results["learning"]["history"]
    assert history[0]["step"] == 0 and history[0]["changed_channels"] > 0  # the start is RIA CP's permutation
    assert results["learning"]["best_val_loss"] <= history[0]["val_loss"]
