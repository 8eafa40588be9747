"""prune_model on tiny models of every family: N:M in every targeted linear, nothing else touched."""

import pytest
import torch

from permsparse.models.binding import get_spec
from permsparse.models.tiny import tiny_llama, tiny_mistral, tiny_qwen2, tiny_vit
from permsparse.permutation.base import Identity
from permsparse.permutation.channel_swap import GreedyChannelSwap
from permsparse.permutation.ria_cp import RIAChannelPermutation
from permsparse.prune import prune_model, prune_model_sequential
from permsparse.sparsity.calibration import collect_stats
from permsparse.sparsity.nm import is_nm
from permsparse.sparsity.pruners import MagnitudePruner, RIAPruner, WandaPruner
from permsparse.sparsity.sparsegpt import SparseGPTPruner

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "vit": tiny_vit}


def _batches(kind: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if kind == "vit":
        return [torch.rand(8, 1, 8, 8, generator=gen) for _ in range(2)]
    return [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(2)]


def _targeted(model) -> set[str]:
    return {f"{n}.weight" for g in get_spec(model).groups(model) for n in g.linears}


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner(), RIAPruner(), SparseGPTPruner(blocksize=16)],
                         ids=["magnitude", "wanda", "ria", "sparsegpt"])
def test_every_targeted_linear_is_nm_and_nothing_else_is_touched(kind, pattern, pruner):
    model = BUILDERS[kind](seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = get_spec(model)
    names = [n for g in spec.groups(model) for n in g.linears]
    stats = collect_stats(model, names, _batches(kind), hessian=pruner.needs_hessian, progress=False)
    report = prune_model(model, pruner, pattern, GreedyChannelSwap(seed=0, perturb_rounds_per_group=0, escape_attempts=10), stats, progress=False)
    after = model.state_dict()
    targeted = _targeted(model)
    assert len(targeted) == (8 if kind == "vit" else 14)
    for key, value in after.items():
        if key in targeted:
            perm = report.perms[next(g.name for g in spec.groups(model) if f"{key[:-7]}" in g.linears)]
            assert is_nm(value[:, perm], pattern), key
            assert not torch.equal(value, before[key])
        else:
            assert torch.equal(value, before[key]), f"{key} was touched"
    for group in report.groups:
        assert group.kept_ratio >= 1.0 - 1e-9  # greedy CP never keeps less than identity


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_permutation_methods_and_identity_agree_on_what_is_pruned(kind):
    """With perm p, the pruned weight equals W * M'[:, argsort(p)] for the mask M' of the permuted scores."""
    from permsparse.permutation.base import invert
    from permsparse.sparsity.nm import nm_mask

    for method in (Identity(), RIAChannelPermutation()):
        model = BUILDERS[kind](seed=1)
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        report = prune_model(model, MagnitudePruner(), "2:4", method, progress=False)
        spec = get_spec(model)
        for group in spec.groups(model):
            perm = report.perms[group.name]
            for name in group.linears:
                w = dense[f"{name}.weight"]
                expected = w * nm_mask(w.abs()[:, perm], "2:4")[:, invert(perm)]
                assert torch.equal(model.get_submodule(name).weight, expected)


def test_sequential_pruning_differs_from_one_shot_but_stays_nm():
    model_a, model_b = tiny_llama(seed=0), tiny_llama(seed=0)
    spec = get_spec(model_a)
    names = [n for g in spec.groups(model_a) for n in g.linears]
    batches = _batches("llama")
    prune_model(model_a, WandaPruner(), "2:4", None, collect_stats(model_a, names, batches, progress=False),
                progress=False)
    prune_model_sequential(model_b, WandaPruner(), "2:4", batches, None, progress=False)
    first = spec.groups(model_a)[0].linears[0]  # block 0 sees the same (dense) inputs in both modes
    assert torch.equal(model_a.get_submodule(first).weight, model_b.get_submodule(first).weight)
    last = spec.groups(model_a)[-1].linears[0]
    assert not torch.equal(model_a.get_submodule(last).weight, model_b.get_submodule(last).weight)
    assert all(is_nm(model_b.get_submodule(n).weight, "2:4") for n in names)


def test_bad_layer_width_is_a_clear_error():
    model = tiny_llama(seed=0, hidden_size=76, num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"d_in=76 is not divisible by M=8"):
        prune_model(model, MagnitudePruner(), "4:8", progress=False)


def test_stats_are_required_for_wanda():
    with pytest.raises(ValueError, match="needs calibration statistics"):
        prune_model(tiny_llama(seed=0), WandaPruner(), "2:4", progress=False)
