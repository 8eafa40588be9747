"""Export (docs/method.md §6): fold, gather, save, reload, verify -- on tiny Llama/Qwen2/Mistral and a tiny timm ViT."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_LM, compose_cfg
from helpers.families import random_perms
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from permsparse.export import (
    SIDECAR,
    ExportVerificationError,
    PermutedLinear,
    export_model,
    find_gathers,
    fold_model,
    load_exported,
    save_pruned_state,
    to_semi_structured,
)
from permsparse.export import fold as fold_mod
from permsparse.models import get_spec
from permsparse.models.tiny import tiny_llama, tiny_mistral, tiny_qwen2, tiny_vit
from permsparse.permutation.foldable import is_foldable
from permsparse.permutation.heads import kv_head_perms, restrict_to_heads
from permsparse.prune import prune_model
from permsparse.runs import RunRecord, export_run
from permsparse.sparsity.nm import check_nm
from permsparse.sparsity.pruners import MagnitudePruner
from permsparse.utils.io import read_json

LMS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}
VIT_BUILD = {"_target_": "permsparse.models.tiny.tiny_vit", "seed": 0}
RESIDUAL_KINDS = {"qkv", "gate_up", "fc1"}


def _layout(group) -> tuple[int, int, int]:
    return group.producer.head_layout


def pruned(build, seed: int = 0, o_mode: str = "within"):
    model = build()
    perms = random_perms(model, seed, o_mode)
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    return model, perms


def bound_linears(model) -> list[str]:
    return [n for g in get_spec(model).groups(model) for n in g.linears]


def assert_nm_in_storage(model) -> None:
    for name in bound_linears(model):
        check_nm(model.get_submodule(name).weight, "2:4", name)


def expected_gathers(model, perms, o_gathered: bool) -> set[str]:
    return {n for g in get_spec(model).groups(model)
            if g.kind in RESIDUAL_KINDS or (o_gathered and g.kind in {"o", "proj"}) for n in g.linears}


def export(model, perms, path, **kw):
    build = VIT_BUILD if get_spec(model).family == "timm_vit" else None
    return export_model(model, perms, "2:4", path, build=build, **kw)


# ------------------------------------------------------------------------------------------------ LLMs


@pytest.mark.parametrize("family", sorted(LMS))
def test_within_head_o_perms_fold_into_v_and_down_into_gate_up(tmp_path, family):
    model, perms = pruned(LMS[family], seed=1, o_mode="within")
    result = export(model, perms, tmp_path / "out")
    modes = {g.kind: g.mode for g in result.report.groups}
    assert modes == {"qkv": "gathered", "gate_up": "gathered", "o": "folded", "down": "folded"}
    assert result.max_abs_diff <= 1e-5 and result.reload_max_abs_diff <= 1e-5
    assert_nm_in_storage(result.model)
    reloaded = load_exported(tmp_path / "out")  # verifies against the stored reference outputs
    assert_nm_in_storage(reloaded)
    assert set(find_gathers(reloaded)) == expected_gathers(model, perms, o_gathered=False)
    sidecar = read_json(tmp_path / "out" / SIDECAR)
    assert sidecar["pattern"] == "2:4" and sidecar["family"] == "llama_like"
    assert sidecar["groups"]["layers.0.o"]["folded"] and sidecar["groups"]["layers.0.o"]["into"][0].endswith("v_proj")
    assert sidecar["groups"]["layers.1.down"]["perm"] == perms["layers.1.down"].tolist()


@pytest.mark.parametrize("family", sorted(LMS))
def test_cross_head_o_perm_is_gathered_and_the_export_stays_exact(tmp_path, family):
    model, perms = pruned(LMS[family], seed=2, o_mode="arbitrary")
    result = export(model, perms, tmp_path / "out", tol=1e-5)
    o = [g for g in result.report.groups if g.kind == "o"]
    assert all(g.mode == "gathered" and "crosses heads" in g.reason for g in o)
    assert all(g.mode == "folded" for g in result.report.groups if g.kind == "down")
    reloaded = load_exported(tmp_path / "out")
    assert set(find_gathers(reloaded)) == expected_gathers(model, perms, o_gathered=True)
    assert_nm_in_storage(reloaded)


def test_gqa_o_perm_within_heads_but_different_across_shared_query_heads_is_gathered():
    model = tiny_llama()
    group = next(g for g in get_spec(model).groups(model) if g.kind == "o")
    head_dim, heads, kv_heads = _layout(group)
    assert kv_heads < heads  # the tiny LMs use grouped-query attention
    gen = torch.Generator().manual_seed(0)
    perm = torch.cat([h * head_dim + torch.randperm(head_dim, generator=gen) for h in range(heads)])
    ok, why = is_foldable(group, perm)
    assert not ok and "grouped-query" in why
    tied = restrict_to_heads(perm, head_dim, heads, kv_heads)
    assert is_foldable(group, tied)[0]


def test_require_foldable_refuses_a_cross_head_o_permutation_with_a_clear_message(tmp_path):
    model, perms = pruned(tiny_llama, seed=3, o_mode="arbitrary")
    with pytest.raises(ValueError, match=r"layers\.0\.o: permutation of 'o' is not foldable \(permutation crosses heads"):
        export(model, perms, tmp_path / "out", require_foldable=True)
    assert not (tmp_path / "out").exists()
    model, perms = pruned(tiny_llama, seed=3, o_mode="within")
    result = export(model, perms, tmp_path / "ok", require_foldable=True)
    assert {g.kind for g in result.report.groups if g.mode == "gathered"} == {"qkv", "gate_up"}


def test_identity_permutations_need_neither_fold_nor_gather(tmp_path):
    model = tiny_qwen2()
    perms = {g.name: torch.arange(model.get_submodule(g.linears[0]).in_features)
             for g in get_spec(model).groups(model)}
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    result = export(model, perms, tmp_path / "out")
    assert {g.mode for g in result.report.groups} == {"identity"}
    assert find_gathers(load_exported(tmp_path / "out")) == {}


def test_deployed_state_dict_keeps_the_stock_keys_and_the_original_is_untouched():
    model, perms = pruned(tiny_llama, seed=4, o_mode="arbitrary")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed, report = fold_model(model, perms, "2:4")
    assert set(deployed.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(deployed.get_submodule(name).weight, before[f"{name}.weight"][:, perms["layers.0.down"]])
    gate = "model.layers.0.mlp.gate_proj"
    expected = before[f"{gate}.weight"][perms["layers.0.down"]][:, perms["layers.0.gate_up"]]
    assert torch.equal(deployed.get_submodule(gate).weight, expected)


def test_permuted_linear_gathers_its_input_and_adds_nothing_to_the_state_dict():
    linear = torch.nn.Linear(8, 3)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 8)
    expected = linear(x)
    with torch.no_grad():
        linear.weight.copy_(linear.weight[:, perm])
    gathered = PermutedLinear.from_linear(linear, perm)
    assert isinstance(gathered, torch.nn.Linear) and set(gathered.state_dict()) == {"weight", "bias"}
    assert gathered.weight is linear.weight
    torch.testing.assert_close(gathered(x), expected)


# ------------------------------------------------------------------------------------------------- ViT


def test_vit_within_head_proj_folds_into_the_v_rows_of_qkv_composed_with_the_qkv_gather(tmp_path):
    model, perms = pruned(tiny_vit, seed=5, o_mode="within")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = export(model, perms, tmp_path / "out")
    modes = {g.kind: g.mode for g in result.report.groups}
    assert modes == {"qkv": "gathered", "proj": "folded", "fc1": "gathered", "fc2": "folded"}
    group = next(g for g in get_spec(model).groups(model) if g.name == "blocks.0.proj")
    head_dim, heads, _ = _layout(group)
    dim = heads * head_dim
    rows = torch.arange(3 * dim)
    rows[2 * dim:] = 2 * dim + perms["blocks.0.proj"]  # within heads, so the v rows follow the proj perm
    qkv = result.model.blocks[0].attn.qkv
    assert torch.equal(qkv.weight, before["blocks.0.attn.qkv.weight"][rows][:, perms["blocks.0.qkv"]])
    assert torch.equal(qkv.bias, before["blocks.0.attn.qkv.bias"][rows])
    reloaded = load_exported(tmp_path / "out")
    assert set(find_gathers(reloaded)) == expected_gathers(model, perms, o_gathered=False)
    assert_nm_in_storage(reloaded)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_vit_arbitrary_proj_perm_is_gathered_and_fc2_still_folds(tmp_path):
    model, perms = pruned(tiny_vit, seed=6, o_mode="arbitrary")
    result = export(model, perms, tmp_path / "out")
    assert {g.kind: g.mode for g in result.report.groups} == {
        "qkv": "gathered", "proj": "gathered", "fc1": "gathered", "fc2": "folded"}
    reloaded = load_exported(tmp_path / "out")
    assert set(find_gathers(reloaded)) == expected_gathers(model, perms, o_gathered=True)


def test_vit_fc2_behind_a_mlp_norm_is_gathered_and_refused_when_foldable_is_required(tmp_path):
    model, perms = pruned(lambda: tiny_vit(scale_mlp_norm=True), seed=10)
    build = {**VIT_BUILD, "scale_mlp_norm": True}
    result = export_model(model, perms, "2:4", tmp_path / "out", build=build)
    fc2 = [g for g in result.report.groups if g.kind == "fc2"]
    assert all(g.mode == "gathered" and "producer type 'none'" in g.reason for g in fc2)
    load_exported(tmp_path / "out")
    with pytest.raises(ValueError, match=r"blocks\.0\.fc2: permutation of 'fc2' is not foldable"):
        export_model(model, perms, "2:4", tmp_path / "refused", build=build, require_foldable=True)


def test_timm_export_without_a_build_node_is_refused(tmp_path):
    model, perms = pruned(tiny_vit)
    with pytest.raises(ValueError, match="needs build="):
        export_model(model, perms, "2:4", tmp_path / "out")


# ----------------------------------------------------------------------------------------- verification


def test_export_raises_when_the_fold_is_tampered_with(tmp_path, monkeypatch):
    model, perms = pruned(tiny_llama, seed=7)
    monkeypatch.setattr(fold_mod, "_row_perms", lambda *a, **k: {})  # forget to permute the producer rows
    with pytest.raises(ExportVerificationError, match="folded model"):
        export(model, perms, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verification_tolerance_is_absolute_for_small_outputs_and_relative_to_the_largest_above():
    from permsparse.export.export import verify_outputs

    logits = torch.tensor([[30.0, 0.1, -2.0]], dtype=torch.float64)
    shifted = logits + torch.tensor([[0.0, 2e-5, -2e-5]], dtype=torch.float64)  # float32 rounding, on small logits too
    assert verify_outputs(logits, shifted, tol=1e-5) == pytest.approx(2e-5)
    small = torch.full((2, 3), 0.1, dtype=torch.float64)
    with pytest.raises(ExportVerificationError, match="tol 1.0e-05"):
        verify_outputs(small, small + 2e-5, tol=1e-5)
    with pytest.raises(ExportVerificationError):  # a real fold error is far above either
        verify_outputs(logits, logits * 1.01, tol=1e-5)


def test_reload_raises_when_the_saved_weights_are_tampered_with(tmp_path):
    model, perms = pruned(tiny_vit, seed=8)
    export(model, perms, tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    state = load_file(str(path))
    key = "blocks.1.mlp.fc2.weight"
    tampered = state[key].clone()
    tampered[tampered != 0] *= 1.01
    save_file({**state, key: tampered}, str(path))
    with pytest.raises(ExportVerificationError, match="reloaded export"):
        load_exported(tmp_path / "out")
    dense = state[key].clone()
    dense[dense == 0] = 0.5
    save_file({**state, key: dense}, str(path))
    with pytest.raises(ValueError, match="not 2:4-sparse"):
        load_exported(tmp_path / "out", verify=False)


def test_export_refuses_a_model_not_pruned_under_the_given_permutations(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="not 2:4-pruned under the permutation"):
        export(model, random_perms(model), tmp_path / "out")


# ------------------------------------------------------------------------------------------ head helpers


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), layout=st.sampled_from([(8, 4, 2), (4, 6, 3), (16, 2, 2), (4, 8, 1)]))
def test_restrict_to_heads_is_foldable_idempotent_and_keeps_foldable_perms(seed, layout):
    head_dim, heads, kv_heads = layout
    perm = torch.randperm(heads * head_dim, generator=torch.Generator().manual_seed(seed))
    tied = restrict_to_heads(perm, head_dim, heads, kv_heads)
    assert torch.equal(torch.sort(tied).values, torch.arange(heads * head_dim))
    local, why = kv_head_perms(tied, head_dim, heads, kv_heads)
    assert local is not None, why
    assert torch.equal(restrict_to_heads(tied, head_dim, heads, kv_heads), tied)


# --------------------------------------------------------------------------------------------- run folders


def test_python_m_export_exports_a_tiny_run_folder(tmp_path):
    from permsparse.run import train

    cfg = compose_cfg([*TINY_LM, "perm=greedy", "pruner=magnitude", "eval.identity_baseline=false"], tmp_path)
    train(cfg)
    # run.py does not save the pruned state yet: rebuild it exactly as the run did (magnitude is deterministic)
    perms = torch.load(tmp_path / "perms.pt")
    model = tiny_llama(seed=int(cfg.seed))
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    save_pruned_state(model, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "permsparse.export", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "exported to" in proc.stdout and "layers.0.down" in proc.stdout
    sidecar = read_json(tmp_path / "export" / SIDECAR)
    assert sidecar["pruner"] == "magnitude" and sidecar["source_run"]["perm"] == "greedy"
    assert_nm_in_storage(load_exported(tmp_path / "export"))


def test_export_run_of_a_run_without_pruned_state_asks_for_a_rerun(tmp_path):
    RunRecord(config={"model": {"load": {"_target_": "x"}}, "sparsity": {}}, model="tiny_llama", dataset="tiny_text",
              pattern="2:4", pruner="magnitude", perm="none", seed=0, protocol={}, versions={}, command="python train.py",
              metrics={}, efficacy={}, kept_ratio={}, perm_seconds={}, learning=None, timings={}).write(tmp_path)
    torch.save({}, tmp_path / "perms.pt")
    with pytest.raises(FileNotFoundError, match="before export support; re-run"):
        export_run(tmp_path)


# ------------------------------------------------------------------------------------------------ kernels


def test_to_semi_structured_refuses_other_patterns_and_machines_without_a_capable_gpu():
    model = tiny_llama()
    with pytest.raises(ValueError, match="only for 2:4, not 4:8"):
        to_semi_structured(model, "4:8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            to_semi_structured(model, "2:4")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with compute capability >= 8.0")
def test_semi_structured_deployed_model_matches_the_dense_deployed_model(tmp_path):
    model, perms = pruned(tiny_llama, seed=9)
    deployed = export(model, perms, tmp_path / "out").model.half().cuda()
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.no_grad():
        dense = deployed(input_ids=ids).logits.float()
        report = to_semi_structured(deployed, "2:4", strict=False)
        sparse = deployed(input_ids=ids).logits.float()
    assert "2:4" in report.values()
    torch.testing.assert_close(sparse, dense, atol=2e-2, rtol=2e-2)

