"""Block-local learning with blocks streamed from a checkpoint's safetensors shards (learning.stream=true): the index
reads one block, a loaded block computes what the in-memory one does, streamed perplexities and permutations equal
the in-memory ones, and at most one block is ever materialised."""

import json
import shutil

import pytest
import torch
from conftest import TINY_LM, compose_cfg
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import permsparse.block_local as block_local
import permsparse.streaming as streaming
from permsparse.block_local import BlockSettings, learn_block_local
from permsparse.config import validate_config
from permsparse.data.text import perplexity
from permsparse.errors import ConfigError
from permsparse.models.binding import get_spec
from permsparse.models.tiny import tiny_hf_tokenizer, tiny_llama
from permsparse.permutation.learned import LearnedPermutation
from permsparse.prune import prune_group, prune_model, prune_model_sequential
from permsparse.run import train
from permsparse.sparsity.calibration import collect_stats, collect_stats_sequential
from permsparse.sparsity.pruners import WandaPruner
from permsparse.streaming import CheckpointIndex, StreamedModel, stream_block_local, streamed_perplexity

# steps that move the permutations (so that equal permutations say something), as in tests/test_block_local.py
METHOD = dict(init="identity", init_scale=0.05)


def _save(tmp_path, **overrides):
    """A tiny Llama saved in several shards (with its tokenizer, so that model=hf_causal_lm loads the folder)."""
    model = tiny_llama(seed=0, **overrides).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="100KB")
    tiny_hf_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    return model, folder


@pytest.fixture
def saved(tmp_path):
    return _save(tmp_path)


def _batches(n, seed, length=16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, length), generator=gen) for _ in range(n)]


def _settings(steps=3):
    return BlockSettings(steps=steps, optimizer=lambda params: torch.optim.AdamW(params, lr=0.1), progress=False)


def test_the_index_reads_exactly_one_blocks_tensors(saved, monkeypatch):
    model, folder = saved
    read = []
    opened = streaming.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = opened(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.f, name)

    index = CheckpointIndex(folder)
    block = model.model.layers[1]
    monkeypatch.setattr(streaming, "safe_open", Recording)
    loaded = index.load(block.state_dict(), "model.layers.1", "cpu")
    assert sorted(read) == sorted(f"model.layers.1.{k}" for k in block.state_dict())  # nothing else was read
    assert len({index.weight_map[n] for n in read}) >= 1
    assert loaded.keys() == block.state_dict().keys()
    for key, value in block.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert index.names("model.layers.1") == sorted(read)
    assert not index.names("model.layers.10")  # a prefix, not a string prefix of "model.layers.1"


def test_the_index_names_the_folder_and_what_is_missing(saved, tmp_path):
    model, folder = saved
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index_file = broken / streaming.INDEX_FILE
    data = json.loads(index_file.read_text())
    del data["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    index_file.write_text(json.dumps(data))
    index = CheckpointIndex(broken)
    with pytest.raises(ConfigError, match=r"broken.*no tensor 'model.layers.1.mlp.down_proj.weight'"):
        index.load(model.model.layers[1].state_dict(), "model.layers.1", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"empty holds no safetensors checkpoint.*config.json"):
        CheckpointIndex(empty)
    with pytest.raises(ConfigError, match="no such folder"):
        CheckpointIndex(tmp_path / "absent")
    config = json.loads((broken / "config.json").read_text())  # a config that does not describe the checkpoint
    config["intermediate_size"] = 256
    (broken / "config.json").write_text(json.dumps(config))
    index_file.write_text(json.dumps({"weight_map": {**data["weight_map"], "model.layers.1.mlp.down_proj.weight":
                                                     "model-00004-of-00004.safetensors"}}))
    wrong = StreamedModel(broken)
    with pytest.raises(ConfigError, match=r"shape mismatch for model.layers.0.mlp.gate_proj.weight: \(128, 64\) in "
                                          r"the checkpoint, \(256, 64\) in the model"), wrong.block(0):
        pass
    assert wrong.materialised() == []  # released on error too


@pytest.mark.parametrize("tied", [False, True])
def test_a_loaded_block_computes_what_the_in_memory_block_does(tmp_path, tied):
    model, folder = _save(tmp_path, tie_word_embeddings=tied)
    streamed = StreamedModel(folder)
    assert streamed.materialised() == []
    assert all(p.device.type == "meta" for b in streamed.blocks for p in b.parameters())
    assert (streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight) == tied
    for name, buffer in model.named_buffers():  # the rotary inv_freq: computed on the host, as in the model
        assert torch.equal(dict(streamed.model.named_buffers())[name], buffer), name
    captured = []
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda mod, args, kwargs: captured.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(_batches(1, 3)[0])
    handle.remove()
    args, kwargs = captured[0]
    with torch.no_grad():
        want = model.model.layers[1](*args, **kwargs)
        with streamed.block(1) as block:
            assert streamed.materialised() == [1]
            got = block(*args, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert streamed.materialised() == []


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_dense_perplexity_equals_the_in_memory_one(tmp_path, tied):
    model, folder = _save(tmp_path, tie_word_embeddings=tied)
    windows = torch.cat(_batches(3, 5, length=24))[:5]  # 5 windows: the last batch of 2 is short, as perplexity's
    want = perplexity(model, windows, batch_size=2, progress=False)
    got = streamed_perplexity(StreamedModel(folder), windows, batch_size=2)
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("sequential", [False, True])
def test_streamed_pruned_perplexity_equals_the_in_memory_one(saved, sequential):
    model, folder = saved
    calib, windows = _batches(2, 1), torch.cat(_batches(2, 2))
    spec = get_spec(model)
    gen = torch.Generator().manual_seed(0)
    perms = {g.name: torch.randperm(model.get_submodule(g.linears[0]).in_features, generator=gen)
             for g in spec.groups(model)}
    if sequential:
        prune_model_sequential(model, WandaPruner(), "2:4", calib, perms, progress=False)
    else:
        stats = collect_stats(model, [n for g in spec.groups(model) for n in g.linears], calib, progress=False)
        prune_model(model, WandaPruner(), "2:4", perms, stats, progress=False)
    want = perplexity(model, windows, batch_size=2, progress=False)
    got = streamed_perplexity(StreamedModel(folder), windows, 2, pruner=WandaPruner(), perms=perms,
                              calibration_batches=calib, sequential=sequential)
    dense = streamed_perplexity(StreamedModel(folder), windows, 2)
    assert got == pytest.approx(want, rel=1e-6) and got != pytest.approx(dense, rel=1e-3)


def _in_memory(model, calib, train_batches, val_batches, windows, stats, sequential):
    """The in-memory block-local run learning on ``stats``, then the run flow's phases (dense, identity, pruned),
    pruned with ``stats`` or (``sequential``) recalibrated block by block."""
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    perms, blocks = learn_block_local(model, LearnedPermutation(**METHOD), WandaPruner(), "2:4", stats, train_batches,
                                      val_batches, _settings())
    metrics = {"dense": perplexity(model, windows, 2, progress=False)}
    for phase, given in (("identity", None), ("pruned", perms)):
        model.load_state_dict(dense_state)
        if sequential:
            prune_model_sequential(model, WandaPruner(), "2:4", calib, given, progress=False)
        else:
            prune_model(model, WandaPruner(), "2:4", given, stats, progress=False)
        metrics[phase] = perplexity(model, windows, 2, progress=False)
    return perms, blocks, metrics


@pytest.mark.parametrize("sequential", [False, True])
def test_the_streamed_run_learns_the_in_memory_permutations(saved, tmp_path, sequential):
    """Both runs learn block ``k`` on the outputs of blocks ``0..k-1`` pruned with their learned permutations.
    Statistics, ``sequential=False``: the dense model's (``collect_stats``, what the in-memory run learns with).
    ``sequential=True``: each block's on the pruned blocks before it (``calibration.sequential=true``'s final
    pruning); the in-memory run is given the statistics ``collect_stats_sequential`` gives when every block is pruned
    with the streamed run's permutations, so equal permutations say that the streamed run learned every block with
    those statistics on those inputs."""
    model, folder = saved
    calib, train_batches, val_batches = _batches(2, 1), _batches(3, 2), _batches(1, 3)
    windows = torch.cat(_batches(2, 4))
    result = stream_block_local(StreamedModel(folder), LearnedPermutation(**METHOD), WandaPruner(), "2:4",
                                train_batches, val_batches, _settings(), calibration_batches=calib,
                                sequential=sequential, eval_sets={"ppl": windows}, eval_batch_size=2,
                                pruned_dir=tmp_path / "pruned")
    spec = get_spec(model)
    if sequential:
        dense_state = {k: v.clone() for k, v in model.state_dict().items()}
        by_block = {i: [g for g in spec.groups(model) if g.block == i] for i in range(2)}
        stats = collect_stats_sequential(
            model, spec.blocks(model), [[n for g in by_block[i] for n in g.linears] for i in range(2)], calib,
            lambda i, s: [prune_group(model, g, WandaPruner(), "2:4", result.perms[g.name], s) for g in by_block[i]],
            progress=False)
        model.load_state_dict(dense_state)
    else:
        stats = collect_stats(model, [n for g in spec.groups(model) for n in g.linears], calib, progress=False)
    perms, blocks, metrics = _in_memory(model, calib, train_batches, val_batches, windows, stats, sequential)
    assert sum(int((p != torch.arange(p.numel())).sum()) for p in perms.values()) > 0  # learning moved them
    assert result.perms.keys() == perms.keys()
    for name, perm in perms.items():
        assert torch.equal(result.perms[name], perm), name
    assert [b["train_losses"] for b in result.blocks] == [b["train_losses"] for b in blocks]
    for phase in ("dense", "identity", "pruned"):
        assert result.metrics[phase]["ppl"] == pytest.approx(metrics[phase], rel=1e-6), phase
    assert metrics["pruned"] != pytest.approx(metrics["dense"], rel=1e-3)
    assert result.reports["pruned"].perms.keys() == perms.keys()
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # the pruned checkpoint, block by block
    assert perplexity(written, windows, 2, progress=False) == pytest.approx(metrics["pruned"], rel=1e-6)


def test_at_most_one_block_is_ever_materialised(saved, monkeypatch):
    _, folder = saved
    streamed = StreamedModel(folder)
    per_block = sum(p.numel() for p in tiny_llama(seed=0).model.layers[0].parameters())
    at_read, at_end = [], []
    read = CheckpointIndex.read

    def recording_read(self, names, device="cpu"):
        at_read.append(streamed.materialised())  # before a block loads, no other block may be loaded
        return read(self, names, device)

    def on_block_end(perms, summaries):
        index = summaries[-1]["block"]
        live = sum(p.numel() for p in streamed.model.parameters() if p.device.type != "meta")
        outside = sum(p.numel() for n, p in streamed.model.named_parameters() if ".layers." not in n)
        at_end.append((streamed.materialised(), live - outside))
        assert index == len(at_end) - 1

    monkeypatch.setattr(CheckpointIndex, "read", recording_read)
    stream_block_local(streamed, LearnedPermutation(**METHOD), WandaPruner(), "2:4", _batches(2, 2), _batches(1, 3),
                       _settings(2), calibration_batches=_batches(2, 1), eval_sets={"ppl": torch.cat(_batches(1, 4))},
                       eval_batch_size=2, on_block_end=on_block_end)
    assert at_read == [[], []]  # one read per block (the modules outside the blocks were read at construction)
    assert at_end == [([0], per_block), ([1], per_block)]
    assert streamed.materialised() == []


def test_a_resumed_stream_prunes_the_finished_blocks_without_training_them(saved, monkeypatch):
    _, folder = saved
    calib, train_batches, val_batches = _batches(2, 1), _batches(3, 2), _batches(1, 3)
    windows = torch.cat(_batches(2, 4))

    def run(done=None):
        return stream_block_local(StreamedModel(folder), LearnedPermutation(**METHOD), WandaPruner(), "2:4",
                                  train_batches, val_batches, _settings(), calibration_batches=calib,
                                  eval_sets={"ppl": windows}, eval_batch_size=2, phases=("pruned",), done=done)

    full = run()
    first = full.blocks[0]
    trained = []
    original = block_local._learn_block
    monkeypatch.setattr(block_local, "_learn_block", lambda model, index, *a: trained.append(index) or
                        original(model, index, *a))
    resumed = run({0: ({g: full.perms[g] for g in first["groups"]}, first)})
    assert trained == [1]
    assert all(torch.equal(resumed.perms[k], v) for k, v in full.perms.items())
    assert resumed.metrics == full.metrics and list(resumed.metrics) == ["pruned"]


def _stream_cfg(folder, tmp_path, *extra):
    rest = [o for o in TINY_LM if not o.startswith("model=")]
    return compose_cfg(["model=hf_causal_lm", f"model.name_or_path={folder}", *rest, "perm=learned",
                        "learning.mode=block", "learning.block_steps=3", "perm.method.init=identity",
                        "perm.method.base=none", "perm.method.init_scale=0.05", "perm.method.mask_grad=false",
                        "perm.optimizer.lr=0.1", "perm.scheduler=null", *extra], tmp_path)


def test_a_streamed_run_writes_the_in_memory_runs_results(saved, tmp_path):
    _, folder = saved
    memory = train(_stream_cfg(folder, tmp_path / "memory"))
    streamed = train(_stream_cfg(folder, tmp_path / "streamed", "learning.stream=true"))
    assert streamed["learning"]["stream"]["source"] == str(folder)
    assert streamed["pruned_file"] is None and "stream" in streamed["timings"]
    assert list(streamed["metrics"]) == list(memory["metrics"]) == ["dense", "identity", "pruned"]
    for phase, values in memory["metrics"].items():
        assert values.keys() == streamed["metrics"][phase].keys()
        for key, value in values.items():
            assert streamed["metrics"][phase][key] == pytest.approx(value, rel=1e-6), (phase, key)
    assert memory["learning"]["changed_channels"] > 0  # learning moved the permutations
    assert streamed["learning"]["changed_channels"] == memory["learning"]["changed_channels"]
    assert streamed["efficacy"]["per_group"] == pytest.approx(memory["efficacy"]["per_group"])
    assert [b["train_losses"] for b in streamed["learning"]["blocks"]] == \
           [b["train_losses"] for b in memory["learning"]["blocks"]]
    want, got = torch.load(tmp_path / "memory" / "perms.pt"), torch.load(tmp_path / "streamed" / "perms.pt")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (tmp_path / "streamed" / "checkpoints" / "blocks.pt").is_file()
    resumed = train(_stream_cfg(folder, tmp_path / "resumed", "learning.stream=true",
                                f"resume={tmp_path / 'streamed'}"))  # every block finished: none is trained again
    assert resumed["metrics"] == streamed["metrics"]
    assert resumed["learning"]["blocks"] == streamed["learning"]["blocks"]
    pruned = load_file(tmp_path / "memory" / "pruned.safetensors")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed" / "pruned").state_dict()
    for key, value in pruned.items():
        assert torch.equal(written[key], value), key
    # the streamed run reads back and exports like the in-memory one, from its pruned/ folder
    from permsparse.export.export import SIDECAR
    from permsparse.runs import export_run, load_run

    want_state = load_run(tmp_path / "memory").model.state_dict()
    got_state = load_run(tmp_path / "streamed").model.state_dict()
    assert want_state.keys() == got_state.keys()
    assert all(torch.equal(want_state[k], got_state[k]) for k in want_state)
    exported = export_run(tmp_path / "streamed")
    assert (exported / SIDECAR).is_file()
    (tmp_path / "streamed" / "pruned").rename(tmp_path / "streamed" / "moved")
    with pytest.raises(FileNotFoundError, match="streamed run's pruned checkpoint folder"):
        load_run(tmp_path / "streamed")


@pytest.mark.parametrize(("overrides", "match"), [
    (["learning.mode=e2e"], "learning.mode=e2e needs the whole model"),
    (["learning.finetune_e2e=true"], "finetune_e2e"),
    (["learning.stream=1"], "learning.stream=1 is invalid"),
])
def test_stream_refuses_what_it_cannot_do(saved, tmp_path, overrides, match):
    _, folder = saved
    with pytest.raises(ConfigError, match=match):
        validate_config(_stream_cfg(folder, tmp_path, "learning.stream=true", *overrides))


def test_stream_needs_a_local_safetensors_folder(saved, tmp_path):
    _, folder = saved
    cfg = compose_cfg([*TINY_LM, "perm=learned", "learning.mode=block", "learning.stream=true"], tmp_path)
    with pytest.raises(ConfigError, match="safetensors checkpoint folder.*model=tiny_llama"):
        validate_config(cfg)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "config.json", bare / "config.json")
    with pytest.raises(ConfigError, match="bare holds no safetensors checkpoint"):
        validate_config(_stream_cfg(bare, tmp_path, "learning.stream=true"))
