"""Qwen2-MoE (issue 12): every routed expert is its own pair of binding groups, with calibration statistics from the
tokens routed to it only; the router and the shared expert's gate stay dense; the shared expert binds like an MLP.
transformers 5 stacks the experts in 3D tensors: the loaders unfuse them into per-expert nn.Linear modules
(models/qwen2_moe.py) and export stacks them back, so the export is a stock checkpoint."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from helpers.families import (
    export_with_shared_residual,
    learned_val_losses,
    prune_greedy_and_check,
    random_perms,
    run_and_export,
    token_batches,
)

from permsparse.errors import ConfigError
from permsparse.export import SIDECAR, ExportVerificationError, export_model, find_gathers, load_exported
from permsparse.models import Qwen2MoeSpec, discover_spec, get_spec
from permsparse.models.binding import BindingGroup, ResidualStream
from permsparse.models.discovery import binding_differences
from permsparse.models.qwen2_moe import ExpertLinears, unfuse_experts
from permsparse.models.tiny import TINY_LM_CONFIG, tiny_qwen2_moe
from permsparse.prune import prune_model
from permsparse.sparsity.calibration import collect_stats
from permsparse.sparsity.pruners import MagnitudePruner
from permsparse.utils.io import read_json

MOE = {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2}
ROUTERS = [f"model.layers.{i}.mlp.{r}.weight" for i in range(2) for r in ("gate", "shared_expert_gate")]


def _stock(seed: int = 0) -> torch.nn.Module:
    """The same tiny model as transformers builds it: experts stacked in 3D tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**{**TINY_LM_CONFIG, **MOE})).eval()


def _jitter(model, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


# ------------------------------------------------------------------------------------------ unfused experts


def test_unfusing_keeps_the_function_and_makes_one_linear_pair_per_expert():
    stock, model = _stock(), tiny_qwen2_moe()
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, ExpertLinears) and len(experts) == 4
    fused = stock.get_submodule("model.layers.0.mlp.experts")
    assert torch.equal(experts[2].gate_up_proj.weight, fused.gate_up_proj[2])  # (128, 64): gate rows, then up
    assert torch.equal(experts[2].down_proj.weight, fused.down_proj[2])
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]


def test_a_model_with_stacked_experts_is_refused_with_the_fix_named():
    with pytest.raises(ConfigError) as info:
        get_spec(_stock())
    message = str(info.value)
    assert "stacked 3D tensors" in message and "unfuse_experts(model)" in message
    assert type(get_spec(unfuse_experts(_stock()))) is Qwen2MoeSpec


# ----------------------------------------------------------------------------------------- spec vs discovery


def test_the_spec_binds_each_expert_alone_and_agrees_with_discovery_but_for_the_dense_shared_gate():
    """Discovery sees every expert (the example routes tokens to all of them) and binds each expert's gate_up and
    down alone, as the spec does. The one difference: ``shared_expert_gate`` (``nn.Linear(hidden, 1)``) reads the same
    tensor as the shared expert's gate/up, so discovery puts it in their group; the spec leaves it dense, like the
    router (which is no nn.Linear, so discovery never sees it). Without that linear the two bindings are equal."""
    model = tiny_qwen2_moe()
    spec = get_spec(model)
    assert type(spec) is Qwen2MoeSpec
    groups = spec.groups(model)
    assert len(groups) == 2 * (2 + 2 + 4 * 2)
    by_name = {g.name: g for g in groups}
    assert by_name["layers.1.experts.3.gate_up"].linears == ["model.layers.1.mlp.experts.3.gate_up_proj"]
    assert by_name["layers.1.experts.3.down"].producer.modules == ("model.layers.1.mlp.experts.3.gate_up_proj",)
    assert by_name["layers.1.experts.3.down"].producer.chunks == 2

    found = discover_spec(model)
    dense = spec.dense_linears(model)
    assert dense == [f"model.layers.{i}.mlp.{r}" for i in range(2) for r in ("gate", "shared_expert_gate")]
    differences = binding_differences(model, spec, found)
    assert len(differences) == 4 and all("shared_expert" in d for d in differences)
    assert all("shared_expert_gate" in d for d in differences if d.startswith("only DiscoveredSpec"))

    class WithoutDenseGates(Qwen2MoeSpec):  # discovery's groups, the spec's dense gates taken out
        def groups(self, m):
            return [BindingGroup(g.name, [n for n in g.linears if n not in dense], g.kind, g.block, g.producer)
                    for g in found.groups(m)]

    assert binding_differences(model, spec, WithoutDenseGates()) == []


# ------------------------------------------------------------------------------------------------ statistics


def test_each_experts_statistics_come_from_the_tokens_routed_to_it_only():
    model = tiny_qwen2_moe()
    spec = get_spec(model)
    names = [n for g in spec.groups(model) for n in g.linears]
    batches = token_batches(n=2, batch=2, length=16)
    stats = collect_stats(model, names, batches, progress=False)

    routed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (router input, chosen experts) per batch, layer 1
    router = model.get_submodule("model.layers.1.mlp.gate")
    handle = router.register_forward_hook(lambda mod, args, out: routed.append((args[0].detach(), out[2].detach())))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    handle.remove()
    tokens = sum(x.shape[0] for x, _ in routed)
    counts = []
    for e in range(4):
        expert = model.get_submodule(f"model.layers.1.mlp.experts.{e}")
        xs = torch.cat([x[(chosen == e).any(dim=-1)] for x, chosen in routed]).double()
        gate, up = (xs @ expert.gate_up_proj.weight.double().T).chunk(2, dim=-1)
        mid = torch.nn.functional.silu(gate) * up
        gate_up, down = (stats[f"model.layers.1.mlp.experts.{e}.{n}"] for n in ("gate_up_proj", "down_proj"))
        assert gate_up.count == down.count == xs.shape[0]
        assert torch.allclose(gate_up.sq_sum, xs.pow(2).sum(0), rtol=1e-9, atol=0)
        assert torch.allclose(down.sq_sum, mid.pow(2).sum(0), rtol=1e-5, atol=1e-9)
        counts.append(xs.shape[0])
    assert all(0 < c < tokens for c in counts) and sum(counts) == 2 * tokens  # top 2 of 4: a strict subset each
    assert stats["model.layers.1.mlp.shared_expert.gate_proj"].count == tokens  # the shared expert sees them all


# ------------------------------------------------------------------------------------------------ pruning


def test_pruning_leaves_exactly_nm_in_every_expert_and_the_routers_untouched():
    model = tiny_qwen2_moe()
    before, report = prune_greedy_and_check(model)
    names = [n for g in get_spec(model).groups(model) for n in g.linears]
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) and (state[k] != 0).all() for k in ROUTERS)
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 16 and all((state[f"{n}.weight"] == 0).float().mean() == 0.5 for n in experts)
    assert any(not torch.equal(p, torch.arange(p.numel())) for k, p in report.perms.items() if ".experts." in k)


def test_a_learned_run_of_a_few_steps_lowers_the_loss():
    model = tiny_qwen2_moe()
    losses, callback = learned_val_losses(model)
    assert min(losses[1:]) < losses[0] - 1e-3, losses
    assert set(callback.final_perms) == {g.name for g in get_spec(model).groups(model)}


# -------------------------------------------------------------------------------------------------- export


MODES = {"qkv": "gathered", "o": "folded", "gate_up": "gathered", "down": "folded", "expert_gate_up": "gathered",
         "expert_down": "folded"}


def test_export_folds_each_experts_down_into_its_gate_up_rows_and_saves_a_stock_checkpoint(tmp_path):
    model = _jitter(tiny_qwen2_moe())
    perms = random_perms(model, seed=1)
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = export_model(model, perms, "2:4", tmp_path / "out")
    assert {g.kind: g.mode for g in result.report.groups} == MODES
    assert result.max_abs_diff <= 1e-5 and result.reload_max_abs_diff <= 1e-5
    gate_up = result.model.get_submodule("model.layers.0.mlp.experts.1.gate_up_proj").weight
    old = before["model.layers.0.mlp.experts.1.gate_up_proj.weight"][:, perms["layers.0.experts.1.gate_up"]]
    down = perms["layers.0.experts.1.down"]
    assert torch.equal(gate_up, torch.cat([old[:64][down], old[64:][down]]))  # gate and up rows moved alike

    reloaded = load_exported(tmp_path / "out")  # verified against the stored reference outputs
    spec = get_spec(model)
    residual = {n for g in spec.groups(model) if isinstance(g.producer, ResidualStream) for n in g.linears}
    assert set(find_gathers(reloaded)) == residual
    assert read_json(tmp_path / "out" / SIDECAR)["family"] == "qwen2_moe"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # stacked back for save_pretrained, which writes the hub's per-expert layout (gate_proj / up_proj / down_proj)
    assert {"model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"} <= keys
    assert not any("gate_up_proj" in k for k in keys)
    stock = tf.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "out")  # no missing or unexpected keys
    assert torch.equal(stock.get_submodule("model.layers.0.mlp.experts").gate_up_proj[1], gate_up)


def test_a_shared_residual_permutation_folds_into_the_routers_columns_too(tmp_path):
    model = _jitter(tiny_qwen2_moe())
    perms, result = export_with_shared_residual(model, tmp_path / "out")
    assert {g.mode for g in result.report.groups} == {"folded"} and result.report.residual_perm is not None
    assert find_gathers(load_exported(tmp_path / "out")) == {}

    class RouterForgotten(Qwen2MoeSpec):  # the residual stream without the router's columns
        def mlp_residual_params(self, m, prefix):
            return [e for e in super().mlp_residual_params(m, prefix) if not e[0].endswith("mlp.gate.weight")]

    with pytest.raises(ExportVerificationError, match="folded model"):
        export_model(model, perms, "2:4", tmp_path / "bad", spec=RouterForgotten())


@pytest.mark.parametrize("perm", ["greedy", "learned"])
def test_a_run_goes_end_to_end_and_its_folder_exports(tmp_path, perm):
    """``perm=learned`` also runs the memory planner, which traces a step on the meta device (no routing there:
    every expert runs on every token, an upper bound on the experts' activations)."""
    results, sidecar, out = run_and_export(tmp_path, "tiny_qwen2_moe", perm)
    assert set(results["efficacy"]["per_group"]) == {g.name for g in Qwen2MoeSpec().groups(tiny_qwen2_moe())}
    assert sidecar["family"] == "qwen2_moe"
    assert {g["kind"] for g in sidecar["groups"].values() if g["mode"] == "folded"} == {"o", "down", "expert_down"}
    load_exported(out)
