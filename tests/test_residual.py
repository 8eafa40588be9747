"""``perm.residual=shared``: one residual-stream permutation, folded into the weights (issue 4).

Tiny Llama (GQA, untied and tied embeddings), Qwen2, Mistral and timm ViT models only: seconds each.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_LM, compose_cfg

from permsparse.config import ConfigError, validate_config
from permsparse.export import (
    SIDECAR,
    export_model,
    find_gathers,
    fold_residual_permutation,
    load_exported,
    plan_fold,
    residual_groups,
)
from permsparse.export.export import example_inputs, model_outputs
from permsparse.models import get_spec
from permsparse.models.tiny import tiny_llama, tiny_mistral, tiny_qwen2, tiny_vit
from permsparse.permutation.channel_swap import GreedyChannelSwap
from permsparse.permutation.efficacy import kept_scores
from permsparse.permutation.foldable import HeadRestricted
from permsparse.permutation.residual import SharedResidual, find_shared_residual, shared_residual_if
from permsparse.permutation.ria_cp import RIAChannelPermutation
from permsparse.prune import group_scores, prune_model, prune_model_sequential
from permsparse.runs import export_run
from permsparse.sparsity.pruners import MagnitudePruner
from permsparse.utils.io import read_json

BUILDS = {
    "llama": tiny_llama,
    "llama_tied": lambda: tiny_llama(tie_word_embeddings=True),
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "vit": tiny_vit,
    "vit_ls_reg_avg": lambda: tiny_vit(init_values=0.1, reg_tokens=2, global_pool="avg", fc_norm=True),
}
VIT_BUILD = {"_target_": "permsparse.models.tiny.tiny_vit", "seed": 0}
RESIDUAL_KINDS = {"qkv", "gate_up", "fc1"}


def _jitter(model, seed: int = 3):
    """Perturb every parameter: at init norms are ones/zeros and biases zeros, so a norm or bias the fold
    forgot would go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _perm(d: int, seed: int = 1) -> torch.Tensor:
    return torch.randperm(d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ fold_residual_permutation


@pytest.mark.parametrize("name", list(BUILDS))
def test_fold_residual_permutation_keeps_the_function_fp32(name):
    model = BUILDS[name]()
    inputs = example_inputs(model)
    ref = model_outputs(model, inputs, dtype=None)
    folded = fold_residual_permutation(copy.deepcopy(model), _perm(64))
    diff = float((model_outputs(folded, inputs, dtype=None) - ref).abs().max())
    assert diff <= 1e-5, diff
    embed = "model.embed_tokens.weight" if "llama" in name or name in ("qwen2", "mistral") else "patch_embed.proj.weight"
    assert not torch.equal(model.get_parameter(embed), folded.get_parameter(embed))


@pytest.mark.parametrize("name", list(BUILDS))
def test_fold_residual_permutation_is_exact_with_nontrivial_norms_and_biases(name):
    model = _jitter(BUILDS[name]())
    inputs = example_inputs(model)
    ref = model_outputs(model, inputs)  # float64 (HF RMSNorm still reduces in float32: ~1e-6 of order noise)
    folded = fold_residual_permutation(copy.deepcopy(model), _perm(64, seed=7))
    diff = float((model_outputs(folded, inputs) - ref).abs().max())
    assert diff <= 1e-5, diff


def test_tied_lm_head_is_permuted_once():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model.lm_head.weight.detach().clone()
    perm = _perm(64)
    fold_residual_permutation(model, perm)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight.detach(), before[:, perm], rtol=0, atol=0)


def test_a_forgotten_parameter_breaks_exactness(monkeypatch):
    """The checks above would catch a missing entry: dropping the final norm makes the outputs differ."""
    model = _jitter(tiny_llama())
    spec = get_spec(model)
    full = spec.residual_params(model)
    monkeypatch.setattr(type(spec), "residual_params", lambda self, m: [e for e in full if e[0] != "model.norm.weight"])
    inputs = example_inputs(model)
    folded = fold_residual_permutation(copy.deepcopy(model), _perm(64), spec)
    assert float((model_outputs(folded, inputs) - model_outputs(model, inputs)).abs().max()) > 1e-3


def test_fold_residual_permutation_rejects_a_non_permutation():
    with pytest.raises(ValueError, match="bijection of range\\(64\\)"):
        fold_residual_permutation(tiny_llama(), torch.arange(63))


# ------------------------------------------------------------------------------------ choosing the perm


def test_shared_residual_runs_the_heuristic_once_on_row_stacked_scores():
    model = tiny_llama()
    pruner = MagnitudePruner()
    groups = residual_groups(model)
    scores = [group_scores(model, g, pruner, None) for g in groups]
    perm = find_shared_residual(GreedyChannelSwap(perturb_rounds_per_group=0, escape_attempts=5), scores, "2:4")
    stacked = torch.cat(scores)
    kept = kept_scores(stacked, perm, "2:4")
    assert kept["method"] >= kept["identity"]  # never below the identity on the tied objective
    # the stacked objective is the sum of the groups' kept scores under that one permutation
    total = sum(kept_scores(s, perm, "2:4")["method"] for s in scores)
    assert total == pytest.approx(kept["method"], rel=1e-9)


@pytest.mark.parametrize("method", [lambda: GreedyChannelSwap(perturb_rounds_per_group=0, escape_attempts=5), RIAChannelPermutation])
def test_prune_model_with_shared_residual_gives_every_residual_group_the_same_perm(method):
    model = tiny_llama()
    report = prune_model(model, MagnitudePruner(), "2:4", SharedResidual(method()), progress=False)
    residual = [g.name for g in residual_groups(model)]
    first = report.perms[residual[0]]
    assert not torch.equal(first, torch.arange(64))
    assert all(torch.equal(report.perms[n], first) for n in residual)
    others = [g for g in report.groups if g.name not in residual]
    assert any(not torch.equal(g.perm, first) for g in others if g.perm.numel() == 64)  # o keeps its own


def test_shared_residual_is_refused_with_sequential_pruning():
    with pytest.raises(ValueError, match="calibration.sequential"):
        prune_model_sequential(tiny_llama(), MagnitudePruner(), "2:4", [], SharedResidual(GreedyChannelSwap()))


def test_shared_residual_if_validates_the_choice():
    base = GreedyChannelSwap()
    assert shared_residual_if(base, "per_layer") is base
    assert isinstance(shared_residual_if(base, "shared"), SharedResidual)
    with pytest.raises(ValueError, match="perm.residual"):
        shared_residual_if(base, "global")


# ------------------------------------------------------------------------------------------------ export


def _shared_pruned(build, foldable: bool = True):
    model = build()
    method = GreedyChannelSwap(perturb_rounds_per_group=0, escape_attempts=5)
    method = SharedResidual(HeadRestricted(method) if foldable else method)
    report = prune_model(model, MagnitudePruner(), "2:4", method, progress=False)
    return model, report.perms


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "mistral", "vit"])
def test_shared_residual_exports_with_no_gathers_and_verifies(tmp_path, name):
    model, perms = _shared_pruned(BUILDS[name])
    plan = {f.name: f for f in plan_fold(model, perms)}
    for g in residual_groups(model):
        assert plan[g.name].mode == "folded" and plan[g.name].into == ["<residual stream>"], plan[g.name].reason
    build = VIT_BUILD if name == "vit" else None
    result = export_model(model, perms, "2:4", tmp_path / "out", build=build)
    assert result.max_abs_diff <= 1e-5 and result.reload_max_abs_diff <= 1e-5
    assert result.report.counts()["gathered"] == 0  # foldable o/proj + folded residual: nothing to gather
    assert find_gathers(result.model) == {}
    sidecar = read_json(tmp_path / "out" / SIDECAR)
    assert sidecar["residual_stream"]["folded"] is True and sidecar["gathers"] == {}
    assert all(sidecar["groups"][g.name]["folded"] for g in residual_groups(model))
    assert find_gathers(load_exported(tmp_path / "out")) == {}  # re-verifies against the stored reference


def test_per_layer_residual_perms_are_still_gathered(tmp_path):
    model = tiny_llama()
    perms = prune_model(model, MagnitudePruner(), "2:4", HeadRestricted(GreedyChannelSwap(perturb_rounds_per_group=0, escape_attempts=5)),
                        progress=False).perms
    plan = {f.name: f for f in plan_fold(model, perms)}
    modes = {plan[g.name].mode for g in residual_groups(model)}
    assert modes == {"gathered"} and "perm.residual=shared" in plan["layers.0.qkv"].reason
    result = export_model(model, perms, "2:4", tmp_path / "out")
    residual_linears = {n for g in residual_groups(model) for n in g.linears}
    assert set(find_gathers(result.model)) == residual_linears
    assert read_json(tmp_path / "out" / SIDECAR)["residual_stream"]["folded"] is False


def test_shared_perm_can_be_left_gathered_with_fold_residual_false():
    model, perms = _shared_pruned(tiny_llama)
    plan = plan_fold(model, perms, fold_residual=False)
    assert {f.mode for f in plan if f.kind in RESIDUAL_KINDS} == {"gathered"}


# ------------------------------------------------------------------------------------------------ config


def test_config_rejects_shared_residual_with_learned_sequential_or_a_bad_value(tmp_path):
    with pytest.raises(ConfigError, match="not supported with perm=learned"):
        validate_config(compose_cfg([*TINY_LM, "perm=learned", "perm.residual=shared"], tmp_path))
    with pytest.raises(ConfigError, match="calibration.sequential=false"):
        validate_config(compose_cfg([*TINY_LM, "perm=greedy", "perm.residual=shared",
                                     "calibration.sequential=true"], tmp_path))
    with pytest.raises(ConfigError, match="perm.residual='global' is invalid"):
        validate_config(compose_cfg([*TINY_LM, "perm=greedy", "perm.residual=global"], tmp_path))


def test_a_greedy_run_with_shared_residual_exports_without_gathers(tmp_path):
    from permsparse.run import train

    cfg = compose_cfg([*TINY_LM, "perm=greedy", "perm.residual=shared", "perm.foldable=true",
                       "perm.method.escape_attempts=5", "pruner=magnitude", "eval.identity_baseline=false",
                       "calibration.sequential=false"], tmp_path)
    train(cfg)
    perms = torch.load(tmp_path / "perms.pt")
    residual = [k for k in perms if k.endswith((".qkv", ".gate_up"))]
    assert all(torch.equal(perms[k], perms[residual[0]]) for k in residual)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "permsparse.export", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "residual stream: one shared permutation folded" in proc.stdout and " 0 gathered" in proc.stdout
    out = tmp_path / "export"
    sidecar = read_json(out / SIDECAR)
    assert sidecar["counts"]["gathered"] == 0 and sidecar["residual_stream"]["folded"] is True
    assert find_gathers(load_exported(out)) == {}
    kept = export_run(tmp_path, tmp_path / "gathered", fold_residual=False)  # opt-out: residual readers gathered
    assert read_json(kept / SIDECAR)["counts"]["gathered"] == 2 * 2  # qkv + gate_up in each of 2 layers
