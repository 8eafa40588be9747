"""scripts/rescore.py: saved runs re-measured on more evaluation windows, reproducing their own numbers first."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import TINY_LM, compose_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import rescore  # noqa: E402

BASE = [*TINY_LM, "dataset=mixture", "dataset.datamodule.sources=[shakespeare,pydoc]",
        "dataset.datamodule.held_out=[kjv]", "dataset.datamodule.seq_len=32", "dataset.datamodule.eval_windows=0",
        "dataset.datamodule.held_out_windows=3", "perm=ria", "eval.dense_baseline=false",
        "eval.identity_baseline=false"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory) -> Path:
    from permsparse.run import train

    root = tmp_path_factory.mktemp("rescore")
    for seed in (0, 1):
        train(compose_cfg([*BASE, f"seed={seed}"], root / f"seed{seed}"))
    return root


def test_rescoring_reproduces_each_runs_own_windows_and_adds_the_next_ones(two_seeds, capsys):
    from permsparse.data.text import eval_windows, load_token_split, perplexity
    from permsparse.runs import load_run

    out = two_seeds / "nll.json"
    assert rescore.main([str(two_seeds), "--set", "held_out_windows=9", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err
    saved = json.loads(out.read_text())
    assert saved["set"] == {"held_out_windows": 9}
    for seed in (0, 1):
        run_dir = two_seeds / f"seed{seed}"
        entry = saved["runs"][str(run_dir)]["ppl_kjv"]
        assert entry["k"] == 3 and len(entry["nll"]) == 9
        recorded = json.loads((run_dir / "results.json").read_text())["metrics"]["pruned"]["ppl_kjv"]
        assert math.exp(sum(entry["nll"][:3]) / 3) == pytest.approx(recorded, rel=1e-4)
        # the next six windows, scored independently on the rebuilt model
        run = load_run(run_dir)
        held = load_token_split("kjv", run.tokenizer, train_fraction=0.0).eval
        later = eval_windows(held, 9, 32)[3:]
        assert math.exp(sum(entry["nll"][3:]) / 6) == pytest.approx(perplexity(run.model, later, 2, False), rel=1e-4)
    assert "own 3 windows" in printed.out and "next 6 windows" in printed.out
    assert "on 3 disjoint blocks of 3 windows" in printed.out


def test_a_model_that_is_not_the_runs_is_named_in_a_warning(two_seeds, capsys):
    run_dir = two_seeds / "seed0"
    record = json.loads((run_dir / "results.json").read_text())
    scores = {str(run_dir): {"ppl_kjv": {"k": 3, "nll": [0.0, 0.0, 0.0]}}}
    runs = [dict(record, _path=str(run_dir))]
    rows = rescore.report(runs, scores)
    assert rows[0]["own"] == [1.0]
    assert "the rebuilt model is not the run's" in capsys.readouterr().err


def test_a_bad_override_and_an_unknown_domain_fail_in_one_line(two_seeds):
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        rescore.main([str(two_seeds), "--set", "held_out_windows"])
    with pytest.raises(SystemExit, match="no evaluation set"):
        rescore.main([str(two_seeds / "seed0"), "--domains", "ppl_nowhere"])


def test_a_domain_that_not_every_seed_was_scored_on_is_left_out(two_seeds):
    runs, scores = [], {}
    for seed in (0, 1):
        run_dir = two_seeds / f"seed{seed}"
        runs.append(dict(json.loads((run_dir / "results.json").read_text()), _path=str(run_dir)))
        scores[str(run_dir)] = {"ppl_kjv": {"k": 0, "nll": [1.0, 2.0]}}
    scores[str(two_seeds / "seed0")]["ppl_other"] = {"k": 0, "nll": [1.0]}
    rows = rescore.report(runs, scores)
    assert [r["metric"] for r in rows] == ["ppl_kjv"]
    assert rows[0]["all"] == [pytest.approx(math.exp(1.5))] * 2
