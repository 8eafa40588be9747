"""``prune.skip_indivisible`` (issue 12): layers whose d_in the pattern (or the learned method's group count) does not
divide are one error by default; with the key set their whole binding groups stay dense and unpermuted, a warning
lists them, and results.json lists them under ``skipped``."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_LM, compose_cfg
from helpers.families import export_with_shared_residual

from permsparse.errors import ConfigError
from permsparse.export import SIDECAR, ExportVerificationError, export_model, find_gathers, load_exported
from permsparse.models import get_spec
from permsparse.models.binding import WithoutGroups, leave_dense, left_dense
from permsparse.models.tiny import tiny_llama
from permsparse.prune import check_model_divisible, prune_model, skip_indivisible
from permsparse.sparsity.nm import NMPattern, is_nm
from permsparse.sparsity.pruners import MagnitudePruner
from permsparse.utils.io import read_json

DOWN = ["layers.0.down", "layers.1.down"]  # down_proj reads intermediate_size=100 channels


def _odd_llama():
    return tiny_llama(seed=0, intermediate_size=100)


def test_the_library_skips_whole_groups_and_prunes_the_rest():
    model = _odd_llama()
    pattern = NMPattern(4, 8)
    with pytest.raises(ConfigError, match="prune.skip_indivisible=true"):
        check_model_divisible(model, get_spec(model).groups(model), pattern)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    skipped = skip_indivisible(model, pattern)
    assert list(skipped) == DOWN
    assert skipped["layers.0.down"]["linears"] == ["model.layers.0.mlp.down_proj"]
    assert "d_in=100 is not divisible by M=8" in skipped["layers.0.down"]["reasons"][0]
    spec = get_spec(model)
    assert isinstance(spec, WithoutGroups) and spec.family == "llama_like" and set(left_dense(model)) == set(DOWN)
    assert [g.name for g in spec.groups(model)] == [g.name for g in spec.all_groups(model) if g.name not in DOWN]
    report = prune_model(model, MagnitudePruner(), pattern, progress=False)
    assert set(report.perms).isdisjoint(DOWN)
    state = model.state_dict()
    for i in range(2):
        key = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(state[key], before[key]) and (state[key] != 0).all()  # dense
        assert is_nm(state[f"model.layers.{i}.mlp.up_proj.weight"], "4:8")  # its producers are pruned as usual


def test_a_run_errors_by_default_and_with_the_key_leaves_the_layer_dense_and_lists_it(tmp_path, caplog):
    from permsparse.run import train
    from permsparse.runs import export_run

    overrides = [*TINY_LM, "+model.load.intermediate_size=100", "sparsity=4:8", "perm=greedy", "pruner=magnitude",
                 "eval.identity_baseline=false"]
    with pytest.raises(ConfigError) as info:
        train(compose_cfg(overrides, tmp_path / "default"))
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj" in message and "model.layers.1.mlp.down_proj" in message

    run = tmp_path / "skip"
    with caplog.at_level(logging.WARNING, logger="permsparse"):
        results = train(compose_cfg([*overrides, "prune.skip_indivisible=true"], run))
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "prune.skip_indivisible=true: 2 binding group(s)" in warning and "layers.1.down" in warning
    assert list(results["skipped"]) == DOWN
    assert read_json(run / "results.json")["skipped"]["layers.1.down"]["linears"] == ["model.layers.1.mlp.down_proj"]
    assert set(results["efficacy"]["per_group"]).isdisjoint(DOWN)
    assert set(torch.load(run / "perms.pt", weights_only=True)).isdisjoint(DOWN)

    from safetensors.torch import load_file

    pruned, fresh = load_file(str(run / "pruned.safetensors")), _odd_llama().state_dict()
    for i in range(2):
        assert torch.equal(pruned[f"model.layers.{i}.mlp.down_proj.weight"], fresh[f"model.layers.{i}.mlp.down_proj.weight"])
        assert (pruned[f"model.layers.{i}.mlp.gate_proj.weight"] == 0).float().mean() == 0.5
    out = export_run(run)  # the rebuilt model is told what the run skipped
    sidecar = read_json(out / SIDECAR)
    assert set(sidecar["groups"]).isdisjoint(DOWN) and len(sidecar["groups"]) == 6
    load_exported(out)


def test_a_learned_run_skips_the_layers_its_group_count_does_not_divide(tmp_path):
    """2:4 divides 100, but perm.method.groups=4 needs d_in divisible by 4 x 4 = 16: only the learned run skips."""
    from permsparse.run import train

    results = train(compose_cfg([*TINY_LM, "+model.load.intermediate_size=100", "sparsity=2:4", "perm=learned",
                                 "pruner=magnitude", "perm.method.groups=4", "eval.identity_baseline=false",
                                 "eval.dense_baseline=false", "prune.skip_indivisible=true"], tmp_path))
    assert list(results["skipped"]) == DOWN
    assert "groups x M = 4 x 4" in results["skipped"]["layers.0.down"]["reasons"][0]
    assert results["learning"]["steps"] > 0


def test_a_bad_value_is_one_line_naming_the_key():
    from permsparse.config import validate_config

    with pytest.raises(ConfigError, match="prune.skip_indivisible='yes'"):
        validate_config(compose_cfg([*TINY_LM, "prune.skip_indivisible=yes"]))


def test_a_shared_residual_permutation_reaches_the_columns_of_a_residual_reader_left_dense(tmp_path):
    """A left-out q/k/v group still reads the residual stream: folding one stream permutation must permute its
    columns like the head's (WithoutGroups adds them), or the function changes."""
    model = tiny_llama(seed=0)
    leave_dense(model, {"layers.0.qkv": "test"})
    perms, result = export_with_shared_residual(model, tmp_path / "out")
    spec = get_spec(model)
    assert result.report.residual_perm is not None and "layers.0.qkv" not in perms
    assert find_gathers(load_exported(tmp_path / "out")) == {}

    class Forgetful(WithoutGroups):
        def residual_params(self, m):
            return self.base.residual_params(m)

    with pytest.raises(ExportVerificationError, match="folded model"):
        export_model(model, perms, "2:4", tmp_path / "bad", spec=Forgetful(spec.base, spec.dense))
