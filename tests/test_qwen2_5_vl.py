"""Qwen2.5-VL (issue 12): the language decoder binds and folds as Qwen2; the vision tower's blocks (fused qkv, proj,
SwiGLU MLP) are an option (``model.targets``). On the tiny random config: the spec equals discovery (the decoder on
token ids, the vision tower on a tiny image), pruning leaves exactly N:M in every targeted linear and nothing else
touched, a learned run lowers its loss, export folds what the spec says, gathers the rest and verifies on token ids
with an image each, and ``train()`` runs end to end on text-only batches."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers.families import (
    assert_exactly_nm_and_nothing_else,
    export_with_shared_residual,
    learned_val_losses,
    prune_greedy_and_check,
    random_perms,
    run_and_export,
    token_batches,
)

from permsparse.errors import ConfigError
from permsparse.export import SIDECAR, ExportVerificationError, export_model, find_gathers, load_exported
from permsparse.models import Qwen2_5_VLSpec, discover_spec, get_spec
from permsparse.models.binding import OutputRows, ResidualStream, SecondStream, ValueRows
from permsparse.models.discovery import binding_differences
from permsparse.models.qwen2_5_vl import image_example, set_targets, targets_of
from permsparse.models.tiny import tiny_qwen2_5_vl
from permsparse.permutation.channel_swap import GreedyChannelSwap
from permsparse.prune import prune_model
from permsparse.sparsity.calibration import collect_stats
from permsparse.sparsity.pruners import MagnitudePruner, WandaPruner
from permsparse.utils.io import read_json

BOTH = ("language", "vision")
LANGUAGE_KINDS = {"qkv": "gathered", "o": "folded", "gate_up": "gathered", "down": "folded"}
VISION_KINDS = {"vision_qkv": "gathered", "vision_proj": "folded", "vision_gate_up": "gathered",
                "vision_down": "folded"}


def _jitter(model, seed: int = 3):
    """Perturb every parameter (norms start at ones and biases at zeros: a forgotten one would go unnoticed)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _bindings(groups, prefix: str = "", offset: int = 0) -> list[tuple[frozenset[str], int]]:
    return [(frozenset(prefix + n for n in g.linears), g.block + offset) for g in groups]


def _image_batches(model, n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [image_example(model, 2, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


# ----------------------------------------------------------------------------------------- spec == discovery


def test_by_default_the_spec_binds_the_decoder_as_qwen2_and_equals_discovery_on_token_ids():
    model = tiny_qwen2_5_vl()
    spec = get_spec(model)
    assert type(spec) is Qwen2_5_VLSpec and targets_of(model) == ("language",)
    groups = spec.groups(model)
    assert len(groups) == 8 and all(".language_model.layers." in n for g in groups for n in g.linears)
    assert spec.block_prefixes(model) == ["model.language_model.layers.0", "model.language_model.layers.1"]
    assert all(a is b for a, b in zip(spec.blocks(model), model.model.language_model.layers, strict=True))
    o = groups[1].producer
    assert isinstance(o, ValueRows) and o.module == "model.language_model.layers.0.self_attn.v_proj"
    assert o.rows == (0, 32) and o.head_layout == (16, 4, 2)  # from config.text_config: 2 kv heads of 16

    found = discover_spec(model, {"input_ids": token_batches(n=1)[0]})  # text only: the vision tower never runs
    assert binding_differences(model, spec, found) == []
    assert found.untargeted == ["lm_head"]


def test_with_the_vision_option_the_vision_blocks_equal_discovery_on_the_vision_tower():
    """Discovery binds one block list per model, the one with the most linears: here the decoder's (7 per layer
    against 5 per vision block), so on the whole model it leaves every vision linear untargeted, even when an image
    runs them. The vision blocks are therefore checked against discovery on the vision tower itself, fed a tiny
    image, and the decoder against discovery on the whole model; that whole-model difference is pinned below."""
    model = tiny_qwen2_5_vl(targets=BOTH)
    spec = get_spec(model)
    groups = spec.groups(model)
    assert len(groups) == 16 and [g.block for g in groups] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    vision, language = groups[:8], groups[8:]
    assert spec.block_prefixes(model) == ["model.visual.blocks.0", "model.visual.blocks.1",
                                          "model.language_model.layers.0", "model.language_model.layers.1"]

    example = image_example(model, 2)
    tower = discover_spec(model.model.visual, (example["pixel_values"], example["image_grid_thw"]))
    assert _bindings(tower.groups(model.model.visual), "model.visual.") == _bindings(vision)
    assert tower.untargeted == ["merger.mlp.0", "merger.mlp.2"]  # the merger stays dense in the spec too

    whole = discover_spec(model, example)
    assert _bindings(whole.groups(model), offset=2) == _bindings(language)
    # the whole-model difference, exactly: the spec's 8 vision groups, and its decoder layers counted as blocks 2, 3
    # (after the vision blocks) where discovery's block list starts at the decoder (blocks 0, 1)
    differences = binding_differences(model, spec, whole)
    only_spec = [d for d in differences if d.startswith("only Qwen2_5_VLSpec binds")]
    only_found = [d for d in differences if d.startswith("only DiscoveredSpec binds")]
    assert len(differences) == 8 + 8 + 8 + 1 and differences[-1].startswith("block prefixes differ")
    assert sum(".visual.blocks." in d for d in only_spec) == 8
    assert sorted(d.rsplit(" ", 1)[-1] for d in only_spec if ".language_model." in d) == ["2"] * 4 + ["3"] * 4
    assert sorted(d.rsplit(" ", 1)[-1] for d in only_found) == ["0"] * 4 + ["1"] * 4

    proj, down = vision[1].producer, vision[3].producer
    assert isinstance(proj, ValueRows) and proj.module == "model.visual.blocks.0.attn.qkv"
    assert proj.rows == (64, 96) and proj.head_layout == (16, 2, 2)  # qkv rows [q | k | v], 2 heads of 16
    assert isinstance(down, OutputRows) and down.modules == ("model.visual.blocks.0.mlp.gate_proj",
                                                             "model.visual.blocks.0.mlp.up_proj")
    assert isinstance(vision[0].producer, SecondStream) and isinstance(language[0].producer, ResidualStream)


def test_targets_are_checked_and_a_run_refuses_the_vision_tower_on_a_text_dataset(tmp_path):
    from conftest import TINY_LM, compose_cfg

    from permsparse.config import validate_config

    with pytest.raises(ConfigError, match="model.targets"):
        set_targets(tiny_qwen2_5_vl(), ["audio"])
    with pytest.raises(ConfigError, match="model.targets"):
        set_targets(tiny_qwen2_5_vl(), [])
    cfg = compose_cfg([*TINY_LM, "model=tiny_qwen2_5_vl", "model.targets=[language,vision]"], tmp_path)
    with pytest.raises(ConfigError, match=r"model.targets=\['language', 'vision'\] includes vision"):
        validate_config(cfg)
    validate_config(compose_cfg([*TINY_LM, "model=tiny_qwen2_5_vl"], tmp_path))  # the default passes


# ------------------------------------------------------------------------------------------------- pruning


def test_by_default_pruning_leaves_the_decoder_exactly_nm_and_the_vision_tower_untouched():
    model = tiny_qwen2_5_vl()
    before, report = prune_greedy_and_check(model)
    visual = [k for k in before if k.startswith("model.visual.")]
    assert len(visual) == 30 and all(torch.equal(model.state_dict()[k], before[k]) for k in visual)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in report.perms.values())


def test_with_the_vision_option_every_vision_block_linear_is_exactly_nm_from_image_statistics():
    model = tiny_qwen2_5_vl(targets=BOTH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = get_spec(model)
    names = [n for g in spec.groups(model) for n in g.linears]
    stats = collect_stats(model, names, _image_batches(model), progress=False)  # token ids with an image each
    assert stats["model.visual.blocks.1.mlp.down_proj"].count == 2 * 2 * 16  # 2 batches x 2 images x 16 patches
    report = prune_model(model, WandaPruner(), "2:4", GreedyChannelSwap(seed=0, perturb_rounds_per_group=0, escape_attempts=10), stats,
                         progress=False)
    assert_exactly_nm_and_nothing_else(model, before, report.perms)  # merger, patch embedding, lm_head untouched
    state = model.state_dict()
    assert all((state[f"{n}.weight"] == 0).float().mean() == 0.5 for n in names if ".visual." in n)
    assert any(not torch.equal(p, torch.arange(p.numel())) for k, p in report.perms.items() if k.startswith("visual."))


# ------------------------------------------------------------------------------------------------ learning


def test_a_learned_run_of_a_few_steps_on_text_lowers_the_loss():
    model = tiny_qwen2_5_vl()
    losses, callback = learned_val_losses(model)
    assert min(losses[1:]) < losses[0] - 1e-3, losses
    assert set(callback.final_perms) == {g.name for g in get_spec(model).groups(model)}


# -------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("targets", [("language",), BOTH, ("vision",)], ids=["language", "language+vision", "vision"])
def test_export_folds_o_proj_and_down_gathers_the_stream_readers_and_verifies_with_an_image(tmp_path, targets):
    model = _jitter(tiny_qwen2_5_vl(targets=targets))
    perms = random_perms(model, seed=1)
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = export_model(model, perms, "2:4", tmp_path / "out")
    expected = {**(VISION_KINDS if "vision" in targets else {}), **(LANGUAGE_KINDS if "language" in targets else {})}
    assert {g.kind: g.mode for g in result.report.groups} == expected
    assert result.max_abs_diff <= 1e-5 and result.reload_max_abs_diff <= 1e-5
    sidecar = read_json(tmp_path / "out" / SIDECAR)
    assert sidecar["family"] == "qwen2_5_vl"
    assert sidecar["verification"]["inputs"]["pixel_values"] == [32, 12]  # the verification ran the vision tower
    reloaded = load_exported(tmp_path / "out")  # verified again against the stored reference outputs
    spec = get_spec(model)
    stream = {n for g in spec.groups(model) if isinstance(g.producer, (ResidualStream, SecondStream))
              for n in g.linears}
    assert set(find_gathers(reloaded)) == stream
    assert targets_of(reloaded) == targets
    state = result.model.state_dict()
    if "vision" not in targets:
        assert all(torch.equal(state[k], v) for k, v in before.items() if k.startswith("model.visual."))
        return
    qkv = "model.visual.blocks.0.attn.qkv"
    proj = perms["visual.blocks.0.proj"]  # within heads: rows of v (64..96) move, q and k stay
    old = before[f"{qkv}.weight"][:, perms["visual.blocks.0.qkv"]]
    assert torch.equal(state[f"{qkv}.weight"], torch.cat([old[:64], old[64:][proj]]))
    assert torch.equal(state[f"{qkv}.bias"], torch.cat([before[f"{qkv}.bias"][:64], before[f"{qkv}.bias"][64:][proj]]))
    down = perms["visual.blocks.0.down"]
    for half in ("gate_proj", "up_proj"):
        name = f"model.visual.blocks.0.mlp.{half}"
        assert torch.equal(state[f"{name}.weight"], before[f"{name}.weight"][down][:, perms["visual.blocks.0.gate_up"]])
        assert torch.equal(state[f"{name}.bias"], before[f"{name}.bias"][down])


def test_a_vision_fold_into_the_wrong_rows_of_qkv_is_caught_by_the_verification(tmp_path):
    class KRows(Qwen2_5_VLSpec):  # folds the vision proj into the k rows of qkv instead of the v rows
        def vision_groups(self, model):
            return [replace(g, producer=replace(g.producer, rows=(32, 64))) if isinstance(g.producer, ValueRows)
                    else g for g in super().vision_groups(model)]

    model = tiny_qwen2_5_vl(targets=BOTH)
    perms = random_perms(model, seed=3)
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    with pytest.raises(ExportVerificationError, match="folded model"):
        export_model(model, perms, "2:4", tmp_path / "out", spec=KRows())


@pytest.mark.parametrize("targets", [("language",), BOTH], ids=["language", "language+vision"])
def test_a_shared_residual_permutation_folds_the_decoder_stream_and_the_merger_rows(tmp_path, targets):
    """``perm.residual=shared``: the decoder's stream is folded (embeddings, norms, writers, lm_head, and the merger's
    last linear, which writes image embeddings into it); the vision tower's readers, a second stream, are gathered."""
    model = _jitter(tiny_qwen2_5_vl(targets=targets))
    perms, result = export_with_shared_residual(model, tmp_path / "out")
    spec = get_spec(model)
    assert result.report.residual_perm is not None
    gathered = {g.kind for g in result.report.by_mode("gathered")}
    assert gathered == ({"vision_qkv", "vision_gate_up"} if "vision" in targets else set())
    assert set(find_gathers(load_exported(tmp_path / "out"))) == {
        n for g in spec.groups(model) if isinstance(g.producer, SecondStream) for n in g.linears}

    class MergerForgotten(Qwen2_5_VLSpec):  # the decoder's stream without the merger's output rows
        def residual_params(self, m):
            return [e for e in super().residual_params(m) if ".merger." not in e[0]]

    with pytest.raises(ExportVerificationError, match="folded model"):
        export_model(model, perms, "2:4", tmp_path / "bad", spec=MergerForgotten())


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("perm", ["greedy", "learned"])
def test_a_run_on_text_only_batches_goes_end_to_end_and_its_folder_exports(tmp_path, perm):


    results, sidecar, out = run_and_export(tmp_path, "tiny_qwen2_5_vl", perm)
    assert set(results["efficacy"]["per_group"]) == {g.name for g in Qwen2_5_VLSpec().groups(tiny_qwen2_5_vl())}
    assert sidecar["family"] == "qwen2_5_vl"
    assert {g["kind"] for g in sidecar["groups"].values() if g["mode"] == "folded"} == {"o", "down"}
    assert not any(".visual." in n for g in sidecar["groups"].values() for n in g["linears"])
    load_exported(out)


def test_a_saved_checkpoint_loads_through_hf_causal_lm_and_the_planner_builds_it_on_meta(tmp_path):
    """``model=hf_causal_lm`` (and conf/model/qwen2_5_vl_3b.yaml) on a Qwen2.5-VL folder: the image-text class is
    chosen (it is no AutoModelForCausalLM), the weights are the saved ones, ``model.targets`` reaches the spec, and
    the planner builds the same binding on the meta device from the folder's config alone."""
    from conftest import TINY_LM, compose_cfg

    from permsparse.models import loaders
    from permsparse.models.tiny import tiny_hf_tokenizer
    from permsparse.plan import meta_model

    folder = tmp_path / "vl"
    original = tiny_qwen2_5_vl(seed=1)
    original.save_pretrained(folder)
    tiny_hf_tokenizer().save_pretrained(folder)
    model, _ = loaders.load_hf_causal_lm(str(folder), targets=["language", "vision"])
    assert type(model) is type(original) and targets_of(model) == ("language", "vision")
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())
    assert [g.name for g in get_spec(model).groups(model)] == \
        [g.name for g in get_spec(set_targets(original, ["language", "vision"])).groups(original)]
    cfg = compose_cfg([*TINY_LM, "model=hf_causal_lm", "dataset=tiny_text", f"model.name_or_path={folder}",
                       "+model.load.targets=[language]"], tmp_path / "out")
    meta, _ = meta_model(cfg.model)
    assert type(meta) is type(original) and targets_of(meta) == ("language",)
    assert [g.name for g in get_spec(meta).groups(meta)] == \
        [g.name for g in get_spec(set_targets(original, ["language"])).groups(original)]
