"""Binding discovery (models/discovery.py): every explicit spec equals discovery, and families without a spec
(Phi, OPT, and timm's EVA) prune, learn and export through discovery alone."""

from __future__ import annotations

import pytest
import torch
from helpers.families import assert_exactly_nm_and_nothing_else, learned_val_losses, token_batches
from torch import nn

from permsparse.errors import ConfigError
from permsparse.export import SIDECAR, export_model, find_gathers, load_exported
from permsparse.models import Discovered, DiscoveredSpec, discover_spec, get_spec
from permsparse.models.binding import BindingGroup
from permsparse.models.discovery import binding_differences, find_block_list
from permsparse.models.llama import LlamaLikeSpec
from permsparse.models.tiny import (
    tiny_gemma3,
    tiny_llama,
    tiny_mistral,
    tiny_opt,
    tiny_phi,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen2_5_vl,
    tiny_vit,
)
from permsparse.permutation.channel_swap import GreedyChannelSwap
from permsparse.prune import prune_model
from permsparse.sparsity.calibration import collect_stats
from permsparse.sparsity.nm import is_nm
from permsparse.sparsity.pruners import MagnitudePruner, WandaPruner
from permsparse.utils.io import read_json

VIT_EXAMPLE = torch.zeros(1, 1, 8, 8)


def _tiny_eva(**overrides):
    import timm

    kwargs = dict(pretrained=False, img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                  in_chans=1, qkv_bias=False, mlp_ratio=2.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("eva02_tiny_patch14_224", **{**kwargs, **overrides}).eval()


def _bindings(spec, model) -> list[tuple[frozenset[str], int]]:
    return [(frozenset(g.linears), g.block) for g in spec.groups(model)]


# ------------------------------------------------------------------------------- explicit spec == discovery


# Qwen2.5-VL's config keeps vocab_size in text_config, so no default example is built: it gets token ids (its
# vision tower, an option, is checked against discovery in tests/test_qwen2_5_vl.py)
@pytest.mark.parametrize("build,example", [(tiny_llama, None), (tiny_qwen2, None), (tiny_mistral, None),
                                           (tiny_gemma3, None), (tiny_phi3, None), (tiny_vit, VIT_EXAMPLE),
                                           (tiny_qwen2_5_vl, {"input_ids": torch.randint(0, 124, (1, 16))})],
                         ids=["llama", "qwen2", "mistral", "gemma3", "phi3", "vit", "qwen2_5_vl"])
def test_every_explicit_spec_binds_what_discovery_finds(build, example):
    model = build(seed=0)
    explicit = get_spec(model)
    assert not isinstance(explicit, DiscoveredSpec)  # the registered spec wins
    found = discover_spec(model, example)
    assert binding_differences(model, explicit, found) == []
    assert _bindings(found, model) == _bindings(explicit, model)  # same sets, blocks and forward order
    assert len(found.groups(model)) == 8 and found.untargeted == (["head"] if build is tiny_vit else ["lm_head"])
    assert found.block_prefixes(model) == explicit.block_prefixes(model)
    assert all(a is b for a, b in zip(found.blocks(model), explicit.blocks(model), strict=True))


def test_a_spec_that_binds_the_wrong_layers_is_caught():
    class VWithO(LlamaLikeSpec):  # v_proj moved from {q, k, v} to {o} in block 1: a plausible copy-paste slip
        def groups(self, model):
            out = super().groups(model)
            qkv, o = out[4], out[5]
            out[4] = BindingGroup(qkv.name, qkv.linears[:2], qkv.kind, 1, qkv.producer)
            out[5] = BindingGroup(o.name, [*o.linears, qkv.linears[2]], o.kind, 1, o.producer)
            return out

    class Swapped(LlamaLikeSpec):  # the right sets, but o and down listed out of forward order
        def groups(self, model):
            out = super().groups(model)
            out[5], out[7] = out[7], out[5]
            return out

    model = tiny_llama(seed=0)
    found = discover_spec(model)
    diff = binding_differences(model, VWithO(), found)
    assert len(diff) == 4 and diff[0] == "only VWithO binds {model.layers.1.self_attn.k_proj, " \
        "model.layers.1.self_attn.q_proj} in block 1"
    diff = binding_differences(model, Swapped(), found)
    assert len(diff) == 1 and diff[0].startswith("same groups in another order")


# ------------------------------------------------------------------------------------ families without a spec


def test_phi_binds_its_parallel_attention_and_mlp_inputs_together():
    """Phi runs attention and MLP in parallel on one norm: q, k, v and fc1 read the same tensor."""
    model = tiny_phi(seed=0)
    spec = get_spec(model)
    assert isinstance(spec, DiscoveredSpec) and spec.family == "hf_causal_lm"
    expected = []
    for i in range(2):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        expected += [(frozenset({f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{m}.fc1"}), i),
                     (frozenset({f"{a}.dense"}), i), (frozenset({f"{m}.fc2"}), i)]
    assert _bindings(spec, model) == expected
    assert spec.untargeted == ["lm_head"]
    assert spec.block_prefixes(model) == ["model.layers.0", "model.layers.1"]
    assert all(isinstance(g.producer, Discovered) for g in spec.groups(model))
    assert spec.groups(model)[0].name == "model.layers.0.self_attn.q_proj+self_attn.k_proj+self_attn.v_proj+mlp.fc1"


@pytest.mark.parametrize("name", ["opt", "gpt_neox", "falcon", "eva"])
def test_other_families_without_a_spec_get_their_groups(name):
    import transformers as tf

    lm = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    if name == "opt":
        model, root, groups = tiny_opt(seed=0), "model.decoder.layers", [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]
    elif name == "gpt_neox":  # parallel residual, but each branch has its own norm: two inputs
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**lm, intermediate_size=128)).eval()
        root, groups = "gpt_neox.layers", [["attention.query_key_value"], ["attention.dense"],
                                           ["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]]
    elif name == "falcon":  # parallel attention on one norm: the fused qkv and the MLP's first linear share it
        model = tf.FalconForCausalLM(tf.FalconConfig(**lm)).eval()
        root, groups = "transformer.h", [["self_attention.query_key_value", "mlp.dense_h_to_4h"],
                                         ["self_attention.dense"], ["mlp.dense_4h_to_h"]]
    else:  # a timm model that is not a VisionTransformer: discovered on a zero image of its input size
        model, root, groups = _tiny_eva(), "blocks", [["attn.qkv"], ["attn.proj"], ["mlp.fc1"], ["mlp.fc2"]]
    spec = get_spec(model)
    assert isinstance(spec, DiscoveredSpec)
    assert spec.family == ("timm" if name == "eva" else "hf_causal_lm")
    assert _bindings(spec, model) == [(frozenset(f"{root}.{i}.{n}" for n in g), i) for i in range(2) for g in groups]
    assert spec.untargeted == (["head"] if name == "eva" else ["lm_head"])


def test_discovery_groups_by_the_tensor_read_not_by_names():
    """A view of the same storage is the same input; a copy, or the same tensor after an in-place write, is not."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.first, self.second, self.third, self.fourth = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            h = self.norm(x)
            y = self.first(h) + self.second(h.view(h.shape)) + self.third(h.clone())
            h.mul_(2.0)  # same storage, new values
            return x + y + self.fourth(h)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.stack = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = self.embed(x)
            for block in self.stack:
                x = block(x)
            return self.head(x)

    model = Toy()
    with pytest.raises(ConfigError, match="no binding spec for model class Toy.*example="):
        get_spec(model)  # nothing to build an example from
    spec = get_spec(model, torch.randn(2, 5, 4))
    found = [(sorted(ls), b) for ls, b in _bindings(spec, model)]
    assert found == [(sorted(g), i) for i in range(2) for g in
                     ([f"stack.{i}.first", f"stack.{i}.second"], [f"stack.{i}.third"], [f"stack.{i}.fourth"])]
    assert spec.untargeted == ["embed", "head"]  # outside the repeated blocks: left dense
    assert get_spec(model) is spec  # cached per model object


def test_the_block_list_is_the_repeated_container_holding_most_linears():
    model = tiny_phi(seed=0)
    name, container = find_block_list(model)
    assert name == "model.layers" and container is model.model.layers
    with pytest.raises(ConfigError, match="Sequential has no block list"):
        discover_spec(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.zeros(1, 4))


def test_get_spec_caches_discovery_and_rediscovers_on_an_explicit_example():
    model = tiny_opt(seed=0)
    first = get_spec(model)
    assert get_spec(model) is first
    again = get_spec(model, example={"input_ids": torch.tensor([[1, 2, 3]])})
    assert again is not first and _bindings(again, model) == _bindings(first, model)
    with pytest.raises(ConfigError, match="no binding spec for model class OPTForCausalLM"):
        get_spec(tiny_opt(seed=0), discover=False)


# ------------------------------------------------------------------------------ what discovery refuses, clearly


def test_gpt2_conv1d_is_refused_by_type_with_the_missing_piece():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()
    with pytest.raises(ConfigError) as info:
        get_spec(model)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "transformer.h.0.attn.c_attn" in message
    assert "Conv1D" in message and "explicit BindingSpec" in message


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_stacked_expert_weights_are_refused_not_left_dense_silently(family):
    """transformers 5 stores a mixture-of-experts layer's experts as 3D tensors applied without nn.Linear: discovery
    would bind attention only and leave the experts dense without a word."""
    import transformers as tf

    lm = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              num_experts_per_tok=2)
    if family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**lm, intermediate_size=128, num_local_experts=4)).eval()
    else:
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**lm, intermediate_size=128, moe_intermediate_size=64,
                                                         shared_expert_intermediate_size=128, num_experts=4)).eval()
    with pytest.raises(ConfigError) as info:
        get_spec(model)
    message = str(info.value)
    assert type(model).__name__ in message and "model.layers.0.mlp.experts.gate_up_proj" in message
    assert "stacked 3D tensors" in message and "Missing piece: per-expert binding groups" in message


def test_a_weight_used_without_calling_its_linear_is_named():
    """timm's EVA with q/v biases computes qkv as F.linear(x, qkv.weight, bias): the hook never sees that input."""
    with pytest.raises(ConfigError) as info:
        get_spec(_tiny_eva(qkv_bias=True))
    message = str(info.value)
    assert "Eva" in message and "blocks.0.attn.qkv" in message and "F.linear" in message


def test_every_indivisible_layer_is_listed_in_one_error():
    model = tiny_phi(seed=0, intermediate_size=100)  # fc2 reads 100 channels: not a multiple of 8
    with pytest.raises(ConfigError) as info:
        prune_model(model, MagnitudePruner(), "4:8", progress=False)
    message = str(info.value)
    assert message.startswith("PhiForCausalLM: 2 bound layer(s) cannot be pruned to 4:8")
    assert "model.layers.0.mlp.fc2: d_in=100 is not divisible by M=8" in message
    assert "model.layers.1.mlp.fc2: d_in=100 is not divisible by M=8" in message
    assert "self_attn" not in message


# ----------------------------------------------------------------------- prune, learn, export through discovery


NO_SPEC = {"phi": tiny_phi, "opt": tiny_opt}


@pytest.mark.parametrize("family", sorted(NO_SPEC))
@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner()], ids=["magnitude", "wanda"])
def test_pruning_through_discovery_leaves_exactly_nm_and_touches_nothing_else(family, pruner):
    model = NO_SPEC[family](seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = get_spec(model)
    names = [n for g in spec.groups(model) for n in g.linears]
    assert len(names) == 12  # 2 blocks x 6 linears; lm_head and embeddings are not bound
    stats = collect_stats(model, names, token_batches(), progress=False) if pruner.needs_stats else None
    report = prune_model(model, pruner, "2:4", GreedyChannelSwap(seed=0, perturb_rounds_per_group=0, escape_attempts=10), stats, progress=False)
    assert_exactly_nm_and_nothing_else(model, before, report.perms)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in report.perms.values())


@pytest.mark.parametrize("family", sorted(NO_SPEC))
def test_sequential_pruning_runs_block_by_block_on_the_discovered_blocks(family):
    """What SparseGPT uses by default: block l calibrated on the output of the pruned blocks < l."""
    from permsparse.prune import prune_model_sequential
    from permsparse.sparsity.sparsegpt import SparseGPTPruner

    model = NO_SPEC[family](seed=0)
    report = prune_model_sequential(model, SparseGPTPruner(blocksize=16), "2:4", token_batches(), progress=False)
    spec = get_spec(model)
    assert [g.name for g in report.groups] == [g.name for g in spec.groups(model)]
    assert all(is_nm(model.get_submodule(n).weight, "2:4") for g in spec.groups(model) for n in g.linears)


@pytest.mark.parametrize("family", sorted(NO_SPEC))
def test_export_through_discovery_gathers_every_group_says_why_and_verifies(tmp_path, family):
    model = NO_SPEC[family](seed=0)
    gen = torch.Generator().manual_seed(1)
    spec = get_spec(model)
    perms = {g.name: torch.randperm(model.get_submodule(g.linears[0]).in_features, generator=gen)
             for g in spec.groups(model)}
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    result = export_model(model, perms, "2:4", tmp_path / "out")
    assert result.max_abs_diff <= 1e-5 and result.reload_max_abs_diff <= 1e-5
    assert {g.mode for g in result.report.groups} == {"gathered"}
    assert all("folding knowledge missing" in g.reason for g in result.report.groups)
    sidecar = read_json(tmp_path / "out" / SIDECAR)
    assert sidecar["family"] == "hf_causal_lm" and sidecar["counts"]["gathered_linears"] == 12
    assert all("no explicit spec" in g["reason"] for g in sidecar["groups"].values())
    reloaded = load_exported(tmp_path / "out")  # rebuilt by AutoModelForCausalLM, gathers re-inserted, verified
    assert type(reloaded) is type(model)
    assert set(find_gathers(reloaded)) == {n for g in spec.groups(model) for n in g.linears}


def test_export_of_a_discovered_timm_model_verifies(tmp_path):
    model = _tiny_eva()
    spec = get_spec(model)
    gen = torch.Generator().manual_seed(0)
    perms = {g.name: torch.randperm(model.get_submodule(g.linears[0]).in_features, generator=gen)
             for g in spec.groups(model)}
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    build = {"_target_": "timm.create_model", "model_name": "eva02_tiny_patch14_224", "pretrained": False,
             "img_size": 28, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 10,
             "in_chans": 1, "qkv_bias": False, "mlp_ratio": 2.0}
    result = export_model(model, perms, "2:4", tmp_path / "out", build=build)
    assert result.report.counts()["gathered"] == 8 and result.reload_max_abs_diff <= 1e-5
    assert read_json(tmp_path / "out" / SIDECAR)["family"] == "timm"


def test_learning_through_discovery_lowers_the_loss_on_a_tiny_phi():
    model = tiny_phi(seed=0)
    losses, callback = learned_val_losses(model)
    assert min(losses[1:]) < losses[0] - 1e-3, losses
    assert set(callback.final_perms) == {g.name for g in get_spec(model).groups(model)}


def test_a_run_of_a_family_without_a_spec_goes_end_to_end(tmp_path):
    """``model=tiny_opt`` through the whole run flow (calibrate, learn, prune, evaluate, write the run folder), then
    the run folder's export."""
    import json

    from conftest import TINY_LM, compose_cfg

    from permsparse.run import train

    results = train(compose_cfg([*TINY_LM, "model=tiny_opt", "perm=learned", "pruner=wanda",
                                 "eval.identity_baseline=false", "learning.train_samples=4"], tmp_path))
    assert results["learning"]["steps"] == 2
    written = json.loads((tmp_path / "results.json").read_text())
    groups = written["efficacy"]["per_group"]
    assert set(groups) == {g.name for g in get_spec(tiny_opt(seed=0)).groups(tiny_opt(seed=0))} and len(groups) == 8
    perms = torch.load(tmp_path / "perms.pt")
    model = tiny_opt(seed=0)
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)  # the stored perms fit the discovered groups

    from permsparse.runs import export_run

    out = export_run(tmp_path)  # the run folder exports (rebuild, gathers, verification) with no spec either
    assert read_json(out / SIDECAR)["family"] == "hf_causal_lm"
    load_exported(out)


def test_the_run_lists_every_layer_the_learned_blocks_do_not_divide(tmp_path):
    from conftest import TINY_LM, compose_cfg

    from permsparse.run import train

    with pytest.raises(ConfigError) as info:  # 64 and 128 channels are not multiples of 3 x 4
        train(compose_cfg([*TINY_LM, "model=tiny_phi", "perm=learned", "perm.method.groups=3"], tmp_path))
    message = str(info.value)
    assert message.startswith("PhiForCausalLM: 12 bound layer(s) cannot be pruned to 2:4")
    assert "model.layers.1.mlp.fc2: d_in=128 is not divisible by groups x M = 3 x 4" in message
