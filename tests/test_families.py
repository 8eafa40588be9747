"""Families with an explicit spec beyond Llama and ViT (issue 12): Gemma 3, Phi-3 and timm's DeiT (plain and
distilled, both ``VisionTransformer``s). Each on a tiny random config: the spec equals discovery, pruning leaves exactly
N:M and nothing else touched, a learned run lowers its loss, export folds what the spec says it can, gathers the rest
and reproduces the masked model."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers.families import (
    assert_exactly_nm_and_nothing_else,
    learned_val_losses,
    random_perms,
    token_batches,
)

from permsparse.export import SIDECAR, ExportVerificationError, export_model, find_gathers, load_exported
from permsparse.export.export import example_inputs, model_outputs
from permsparse.export.residual import fold_residual_permutation
from permsparse.models import Gemma3Spec, LlamaLikeSpec, Phi3Spec, TimmViTSpec, discover_spec, get_spec
from permsparse.models.binding import OutputRows, ResidualStream, ValueRows
from permsparse.models.discovery import binding_differences
from permsparse.models.tiny import tiny_gemma3, tiny_phi3
from permsparse.permutation.channel_swap import GreedyChannelSwap
from permsparse.permutation.foldable import is_foldable
from permsparse.prune import prune_model
from permsparse.sparsity.calibration import collect_stats
from permsparse.sparsity.pruners import MagnitudePruner, WandaPruner
from permsparse.utils.io import read_json

DEIT_KWARGS = dict(pretrained=False, img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=2,
                   num_heads=4, mlp_ratio=2.0)
DEIT = {"deit": "deit_tiny_patch16_224", "deit_distilled": "deit_tiny_distilled_patch16_224"}


def _deit_build(name: str) -> dict:
    return {"_target_": "timm.create_model", "model_name": DEIT[name], **DEIT_KWARGS}


def _deit(name: str):
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(DEIT[name], **DEIT_KWARGS).eval()


BUILDS = {"gemma3": tiny_gemma3, "phi3": tiny_phi3, "deit": lambda: _deit("deit"),
          "deit_distilled": lambda: _deit("deit_distilled")}
SPEC_OF = {"gemma3": Gemma3Spec, "phi3": Phi3Spec, "deit": TimmViTSpec, "deit_distilled": TimmViTSpec}
LMS = ("gemma3", "phi3")


def _jitter(model, seed: int = 3):
    """Perturb every parameter: at init Gemma's norms are zeros (it computes ``1 + weight``) and biases zeros, so a
    norm the fold forgot would go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _build_node(family: str) -> dict | None:
    return _deit_build(family) if family in DEIT else None


# ----------------------------------------------------------------------------------------- spec == discovery


@pytest.mark.parametrize("family", list(BUILDS))
def test_the_explicit_spec_matches_by_class_and_equals_discovery(family):
    model = BUILDS[family]()
    spec = get_spec(model)
    assert type(spec) is SPEC_OF[family]
    found = discover_spec(model)
    assert binding_differences(model, spec, found) == []
    assert found.untargeted == {"deit_distilled": ["head", "head_dist"], "deit": ["head"]}.get(family, ["lm_head"])
    assert len(spec.groups(model)) == 8


def test_phi3_producers_point_at_the_v_rows_and_both_halves_of_the_fused_layers():
    model = tiny_phi3()
    groups = {g.name: g for g in get_spec(model).groups(model)}
    o, down = groups["layers.0.o"].producer, groups["layers.0.down"].producer
    assert isinstance(o, ValueRows) and o.module == "model.layers.0.self_attn.qkv_proj"
    assert o.rows == (96, 128) and o.head_layout == (16, 4, 2)  # after q (4 x 16) and k (2 x 16)
    assert isinstance(down, OutputRows) and down.modules == ("model.layers.0.mlp.gate_up_proj",) and down.chunks == 2
    assert isinstance(groups["layers.0.qkv"].producer, ResidualStream)


def test_gemma3_has_one_kv_head_so_o_must_use_one_permutation_for_all_query_heads():
    model = tiny_gemma3()
    group = next(g for g in get_spec(model).groups(model) if g.kind == "o")
    assert group.producer.head_layout == (16, 4, 1)
    local = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    same = torch.cat([h * 16 + local for h in range(4)])
    assert is_foldable(group, same)[0]
    differs = same.clone()
    differs[16:32] = 16 + torch.randperm(16, generator=torch.Generator().manual_seed(1))
    ok, why = is_foldable(group, differs)
    assert not ok and "grouped-query" in why


# ------------------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("family", list(BUILDS))
def test_pruning_leaves_exactly_nm_in_every_bound_linear_and_touches_nothing_else(family):
    model = BUILDS[family]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = get_spec(model)
    if family in LMS:
        pruner = WandaPruner()
        names = [n for g in spec.groups(model) for n in g.linears]
        stats = collect_stats(model, names, token_batches(), progress=False)
    else:
        pruner, stats = MagnitudePruner(), None
    report = prune_model(model, pruner, "2:4", GreedyChannelSwap(seed=0, perturb_rounds_per_group=0, escape_attempts=10), stats, progress=False)
    assert_exactly_nm_and_nothing_else(model, before, report.perms)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in report.perms.values())


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("family", LMS)
def test_a_learned_run_of_a_few_steps_lowers_the_loss(family):
    model = BUILDS[family]()
    losses, callback = learned_val_losses(model)
    assert min(losses[1:]) < losses[0] - 1e-3, losses
    assert set(callback.final_perms) == {g.name for g in get_spec(model).groups(model)}


# -------------------------------------------------------------------------------------------------- export


EXPECTED_MODES = {"gemma3": {"qkv": "gathered", "o": "folded", "gate_up": "gathered", "down": "folded"},
                  "deit": {"qkv": "gathered", "proj": "folded", "fc1": "gathered", "fc2": "folded"}}
EXPECTED_MODES["phi3"] = EXPECTED_MODES["gemma3"]
EXPECTED_MODES["deit_distilled"] = EXPECTED_MODES["deit"]


@pytest.mark.parametrize("family", list(BUILDS))
def test_export_folds_what_the_spec_can_gathers_the_residual_readers_and_verifies(tmp_path, family):
    model = _jitter(BUILDS[family]())
    perms = random_perms(model, seed=1)
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = export_model(model, perms, "2:4", tmp_path / "out", build=_build_node(family))
    assert {g.kind: g.mode for g in result.report.groups} == EXPECTED_MODES[family]
    assert result.max_abs_diff <= 1e-5 and result.reload_max_abs_diff <= 1e-5
    spec = get_spec(model)
    residual = {n for g in spec.groups(model) if isinstance(g.producer, ResidualStream) for n in g.linears}
    reloaded = load_exported(tmp_path / "out")  # verified against the stored reference outputs
    assert set(find_gathers(reloaded)) == residual
    assert read_json(tmp_path / "out" / SIDECAR)["family"] == spec.family
    if family == "phi3":  # o's permutation moved the v rows only; down's moved both halves of gate_up alike
        qkv = result.model.get_submodule("model.layers.0.self_attn.qkv_proj").weight
        old = before["model.layers.0.self_attn.qkv_proj.weight"][:, perms["layers.0.qkv"]]
        assert torch.equal(qkv[:96], old[:96])
        o = perms["layers.0.o"]  # query heads 0, 1 read kv head 0 and heads 2, 3 kv head 1: one local perm each
        assert torch.equal(qkv[96:], old[96:][torch.cat([o[:16], o[32:48] - 16])])
        gate_up = result.model.get_submodule("model.layers.0.mlp.gate_up_proj").weight
        old = before["model.layers.0.mlp.gate_up_proj.weight"][:, perms["layers.0.gate_up"]]
        down = perms["layers.0.down"]
        assert torch.equal(gate_up, torch.cat([old[:128][down], old[128:][down]]))


@pytest.mark.parametrize("family", list(BUILDS))
def test_a_shared_residual_permutation_folds_every_group_and_the_export_has_no_gather(tmp_path, family):
    """``perm.residual=shared``: the residual-stream parameters the spec lists (Gemma's four norms and tied
    embedding, DeiT distilled's second head) carry the one permutation; the export needs no runtime gather."""
    model = _jitter(BUILDS[family]())
    perms = random_perms(model, seed=2)
    spec = get_spec(model)
    shared = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    perms.update({g.name: shared for g in spec.groups(model) if isinstance(g.producer, ResidualStream)})
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    result = export_model(model, perms, "2:4", tmp_path / "out", build=_build_node(family))
    assert {g.mode for g in result.report.groups} == {"folded"} and result.report.residual_perm is not None
    assert find_gathers(load_exported(tmp_path / "out")) == {}


def test_gemma3_residual_stream_needs_its_pre_and_post_feedforward_norms():
    model = _jitter(tiny_gemma3())
    inputs = example_inputs(model)
    reference = model_outputs(model, inputs, dtype=None)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))

    def diff(spec) -> float:
        folded = fold_residual_permutation(copy.deepcopy(model), perm, spec)
        return float((model_outputs(folded, inputs, dtype=None) - reference).abs().max())

    class LlamaNormsOnly(Gemma3Spec):
        layer_norms = LlamaLikeSpec.layer_norms

    assert diff(Gemma3Spec()) <= 1e-5
    assert diff(LlamaNormsOnly()) > 1e-2  # forgetting two norms per layer changes the function


def test_a_wrong_v_row_offset_in_phi3s_qkv_is_caught_by_the_verification(tmp_path):
    class KRows(Phi3Spec):  # folds o into the k rows of qkv_proj instead of the v rows
        def groups(self, model):
            return [replace(g, producer=replace(g.producer, rows=(64, 96))) if isinstance(g.producer, ValueRows)
                    else g for g in super().groups(model)]

    model = tiny_phi3()
    perms = random_perms(model, seed=3)
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    with pytest.raises(ExportVerificationError, match="folded model"):
        export_model(model, perms, "2:4", tmp_path / "out", spec=KRows())
    assert not (tmp_path / "out").exists()


def test_a_run_of_gemma3_goes_end_to_end_and_its_folder_exports(tmp_path):
    from conftest import TINY_LM, compose_cfg

    from permsparse.run import train
    from permsparse.runs import export_run

    results = train(compose_cfg([*TINY_LM, "model=tiny_gemma3", "perm=greedy", "pruner=wanda", "perm.foldable=true",
                                 "eval.identity_baseline=false"], tmp_path))
    assert set(results["efficacy"]["per_group"]) == {g.name for g in Gemma3Spec().groups(tiny_gemma3())}
    out = export_run(tmp_path)
    sidecar = read_json(out / SIDECAR)
    assert sidecar["family"] == "gemma3"
    assert {g["kind"] for g in sidecar["groups"].values() if g["mode"] == "folded"} >= {"o", "down"}
    load_exported(out)
