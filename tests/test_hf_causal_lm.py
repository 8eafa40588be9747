"""``model=hf_causal_lm``: any Hugging Face causal LM by hub id, local folder or GGUF file, with one override (issue 12).

Tiny models saved to a local folder in ``tmp_path`` with the ASCII tokenizer saved beside them: a family with an
explicit spec (Phi-3) and one bound by discovery (OPT) run the whole flow and export. No network."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LM, compose_cfg

from permsparse.config import ConfigError, validate_config
from permsparse.export import SIDECAR, load_exported
from permsparse.models import loaders
from permsparse.models.tiny import tiny_hf_tokenizer, tiny_opt, tiny_phi3, tiny_tokenizer
from permsparse.run import train
from permsparse.runs import export_run
from permsparse.utils.io import read_json

BASE = [*TINY_LM, "model=hf_causal_lm", "dataset=tiny_text"]


def _saved(build, folder):
    model = build()
    model.save_pretrained(folder)
    tiny_hf_tokenizer().save_pretrained(folder)
    return model


def test_without_name_or_path_it_fails_before_loading_with_one_line(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(loaders, "load_hf_causal_lm", never)
    cfg = compose_cfg(BASE, tmp_path)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert message.startswith("model.name_or_path is not set: model=hf_causal_lm needs model.name_or_path=")
    assert "\n" not in message and "model.gguf_file" in message
    with pytest.raises(ConfigError, match="model.name_or_path is not set"):
        train(cfg)


def test_a_missing_local_folder_or_gguf_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        validate_config(compose_cfg([*BASE, f"model.name_or_path={tmp_path / 'absent'}"], tmp_path))
    with pytest.raises(ConfigError, match=r"model.gguf_file=x.gguf: .*x.gguf does not exist"):
        validate_config(compose_cfg([*BASE, f"model.name_or_path={tmp_path}", "model.gguf_file=x.gguf"], tmp_path))
    # offline (as the tests run) a hub id must be in the local cache; online it is left to the loader
    with pytest.raises(ConfigError, match="needs owner/name from the Hugging Face Hub, which is offline here"):
        validate_config(compose_cfg([*BASE, "model.name_or_path=owner/name"], tmp_path))


def test_the_folder_loads_with_its_saved_tokenizer(tmp_path):
    folder = tmp_path / "model"
    original = _saved(tiny_phi3, folder)
    model, tokenizer = loaders.load_hf_causal_lm(str(folder))
    assert type(model) is type(original) and not model.training
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())
    text = "To be, or not to be:\n\tthat is the question."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer()(text)["input_ids"]


@pytest.mark.parametrize("build,family", [(tiny_phi3, "phi3"), (tiny_opt, "hf_causal_lm")], ids=["phi3", "opt"])
def test_a_local_folder_runs_end_to_end_and_exports(tmp_path, build, family):
    """The whole flow from ``model.name_or_path`` alone. The run tokenises with the equal pure-Python tokenizer
    (``model.tokenizer``; the test above shows the folder's gives the same ids): the fast one would take seconds
    on the corpus, for a tmp folder name that no token cache knows."""
    folder = tmp_path / "model"
    _saved(build, folder)
    run = tmp_path / "run"
    results = train(compose_cfg([*BASE, f"model.name_or_path={folder}", "perm=greedy", "pruner=wanda",
                                 "eval.identity_baseline=false",
                                 "+model.tokenizer._target_=permsparse.models.tiny.tiny_tokenizer"], run))
    assert len(results["efficacy"]["per_group"]) == 8
    out = export_run(run)
    assert read_json(out / SIDECAR)["family"] == family
    reloaded = load_exported(out)
    assert type(reloaded) is type(build())


def test_a_gguf_file_goes_to_both_loaders_and_the_model_is_rebuilt_serialisable(tmp_path, monkeypatch):
    """transformers dequantises the GGUF file; a model so loaded keeps a quantizer that refuses save_pretrained, so
    the loader rebuilds it without one (what export needs). The GGUF parsing itself is transformers' (slow test
    below on the embedded SmolLM2)."""
    import transformers

    folder = tmp_path / "model"
    original = _saved(tiny_phi3, folder)
    seen = []

    def fake(loader):
        real = loader.from_pretrained

        def from_pretrained(path, *args, gguf_file=None, **kwargs):
            seen.append((loader.__name__, gguf_file))
            return real(path, *args, **kwargs)

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake(transformers.AutoTokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake(transformers.AutoModelForCausalLM))
    model, tokenizer = loaders.load_hf_causal_lm(folder, dtype="float32", gguf_file="tiny.Q8_0.gguf")
    assert seen == [("AutoTokenizer", "tiny.Q8_0.gguf"), ("AutoModelForCausalLM", "tiny.Q8_0.gguf")]
    assert type(model) is type(original) and not model.training
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "saved")


@pytest.mark.slow
def test_the_embedded_smollm2_gguf_loads_through_hf_causal_lm(tmp_path):
    gguf = loaders.smollm2_gguf_path()
    cfg = compose_cfg([*BASE, f"model.name_or_path={gguf.parent}", f"model.gguf_file={gguf.name}"], tmp_path)
    validate_config(cfg)
    model, tokenizer = loaders.load_hf_causal_lm(gguf.parent, gguf_file=gguf.name)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    model.save_pretrained(tmp_path / "saved")  # rebuilt without the quantizer
