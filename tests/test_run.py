"""End to end on tiny models: every perm x pruner writes a valid results.json; sweeps; W&B offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_LM, TINY_VIT, compose_cfg

from permsparse.run import train
from permsparse.sparsity.nm import is_nm

PERMS = ["none", "greedy", "ria", "learned"]
PRUNERS = ["magnitude", "wanda", "ria", "sparsegpt"]


def _check_results(out: Path, perm: str, pruner: str) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["perm"] == perm and results["pruner"] == pruner and results["pattern"] == "2:4"
    assert results["config"]["perm"]["name"] == perm
    assert torch.__version__.startswith(results["versions"]["torch"])
    for phase in ["dense", "pruned"]:
        assert results["metrics"][phase] and all(v == v for v in results["metrics"][phase].values())
    groups = results["efficacy"]["per_group"]
    assert len(groups) == 8 and set(groups) == set(results["kept_ratio"]["per_group"])
    if perm == "none":
        assert results["efficacy"]["mean"] == 0.0 and results["kept_ratio"]["mean"] == pytest.approx(1.0)
    else:
        assert results["kept_ratio"]["mean"] >= 1.0 - 1e-6
    assert {"load", "eval_dense", "prune", "eval_pruned"} <= set(results["timings"])
    perms = torch.load(out / "perms.pt")
    assert set(perms) == set(groups)
    return results


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("perm", PERMS)
def test_every_perm_and_pruner_runs_end_to_end_on_a_tiny_llama(tmp_path, perm, pruner):
    cfg = compose_cfg([*TINY_LM, f"perm={perm}", f"pruner={pruner}", "eval.identity_baseline=false",
                       "learning.train_samples=4"], tmp_path)
    train(cfg)
    results = _check_results(tmp_path, perm, pruner)
    if perm == "learned":
        assert results["learning"]["steps"] == 2
        assert results["learning"]["history"][0]["step"] == 0  # the starting permutation is scored too


def test_learned_run_on_a_tiny_vit_keeps_every_targeted_linear_n_m(tmp_path):
    cfg = compose_cfg([*TINY_VIT, "perm=learned", "pruner=wanda"], tmp_path)
    results = train(cfg)
    assert "identity" in results["metrics"] and "top1" in results["metrics"]["pruned"]
    _check_results(tmp_path, "learned", "wanda")


def test_two_value_multirun_writes_one_result_per_run_and_compare_reads_them(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    # ria, not greedy: train.py runs greedy CP's perturbation phase, most of a minute on the tiny model here
    cmd = [sys.executable, "train.py", "-m", "perm=none,ria", *TINY_LM, f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(tmp_path.rglob("results.json"))
    assert len(results) == 2
    assert {json.loads(p.read_text())["perm"] for p in results} == {"none", "ria"}
    proc = subprocess.run([sys.executable, "scripts/compare.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perm=ria " in proc.stdout and "perm=none " in proc.stdout and "gap_closed" in proc.stdout
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_wandb_offline_run_folder_holds_the_summary_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg([*TINY_LM, "perm=greedy", "logger=wandb", "eval.identity_baseline=false"], tmp_path)
    results = train(cfg)
    from helpers.wandb_offline import iter_records, read_offline_summary

    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1, "no offline W&B run folder was written"
    summary = read_offline_summary(run_dirs[0])
    assert summary["pruned/ppl_shakespeare"] == pytest.approx(results["metrics"]["pruned"]["ppl_shakespeare"])
    assert summary["dense/ppl_pydoc"] == pytest.approx(results["metrics"]["dense"]["ppl_pydoc"])
    assert summary["perm/mean_efficacy"] == pytest.approx(results["efficacy"]["mean"])
    run = next(r.run for r in iter_records(next(run_dirs[0].glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run")
    assert run.run_group == "tiny_llama_tiny_text"  # the dashboard groups runs by experiment
    assert set(run.tags) == {"tiny_llama", "2:4", "wanda", "greedy"}


def test_pruned_model_is_n_m_in_every_targeted_linear_after_a_run(tmp_path):
    from permsparse.models.binding import get_spec
    from permsparse.models.tiny import tiny_llama
    from permsparse.prune import prune_model
    from permsparse.sparsity.pruners import MagnitudePruner

    model = tiny_llama(seed=0)
    perms = torch.load(_run_and_get(tmp_path) / "perms.pt")
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    for group in get_spec(model).groups(model):
        for name in group.linears:
            assert is_nm(model.get_submodule(name).weight[:, perms[group.name]], "2:4")


def _run_and_get(tmp_path: Path) -> Path:
    train(compose_cfg([*TINY_LM, "perm=learned", "pruner=magnitude", "eval.identity_baseline=false"], tmp_path))
    return tmp_path


def test_mixed_precision_option_trains_the_permutations_under_autocast(tmp_path):
    """``trainer.precision=bf16-mixed`` (what trainer=gpu uses) runs the learned method under autocast (here the
    CPU autocast; no GPU needed): the starting validation loss differs from fp32, and the costs still move."""
    overrides = [*TINY_LM, "perm=learned", "learning.train_samples=16", "learning.val_every_n_steps=4",
                 "perm.optimizer.lr=0.5", "eval.identity_baseline=false"]
    fp32 = train(compose_cfg(overrides, tmp_path / "fp32"))
    bf16 = train(compose_cfg([*overrides, "trainer.precision=bf16-mixed"], tmp_path / "bf16"))
    start_fp32, start_bf16 = fp32["learning"]["history"][0], bf16["learning"]["history"][0]
    assert start_bf16["val_loss"] != start_fp32["val_loss"]  # autocast really is on
    assert abs(start_bf16["val_loss"] - start_fp32["val_loss"]) < 1e-2
    assert max(h["changed_channels"] for h in bf16["learning"]["history"]) > 0
    assert bf16["config"]["trainer"]["precision"] == "bf16-mixed"


def test_every_committed_run_record_reads_back():
    """results/ holds runs of earlier code versions: RunRecord reads them all, and round-trips them unchanged."""
    import json

    from permsparse.runs import RunRecord, find_runs

    runs = find_runs(ROOT / "results")
    assert len(runs) >= 10
    for run_dir in runs:
        data = json.loads((run_dir / "results.json").read_text())
        record = RunRecord.read(run_dir)
        assert record.metrics == data["metrics"] and record.pattern == data["pattern"]
        assert {k: v for k, v in record.to_dict().items() if k in data} == data


def test_a_learned_permutation_is_applied_in_block_by_block_pruning(tmp_path):
    """calibration.sequential=true with perm=learned: learning on the dense statistics, then the learned
    permutations in the sequential pruning, which recalibrates every block on the pruned blocks before it."""
    cfg = compose_cfg([*TINY_LM, "perm=learned", "pruner=sparsegpt", "eval.identity_baseline=false",
                       "learning.train_samples=4"], tmp_path)
    assert cfg.calibration.sequential is True
    results = train(cfg)
    _check_results(tmp_path, "learned", "sparsegpt")
    assert "calibrate" in results["timings"]  # the dense statistics the learning used
    dense_calibrated = compose_cfg([*TINY_LM, "perm=learned", "pruner=sparsegpt", "eval.identity_baseline=false",
                                    "learning.train_samples=4", "calibration.sequential=false"], tmp_path / "one_pass")
    other = train(dense_calibrated)
    perms, other_perms = torch.load(tmp_path / "perms.pt"), torch.load(tmp_path / "one_pass" / "perms.pt")
    assert all(torch.equal(perms[k], other_perms[k]) for k in perms)  # same learning, same permutations
    assert results["metrics"]["pruned"] != other["metrics"]["pruned"]  # but other weight updates
