"""The offline miniatures of the paper's tables (conf/experiment/mini_*.yaml, docs/reproduction.md): every job
composes and validates offline, and the runs each sweep writes land in every cell of its table that it is meant to
fill, under the stand-in model, so that ``scripts/make_tables.py`` can build the committed table from them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import CONF, compose_cfg
from omegaconf import OmegaConf
from test_paper_experiments import _jobs

from permsparse import paper
from permsparse.config import validate_config
from permsparse.runs import RunRecord
from permsparse.tables import Run, fill

MINI = sorted(p.stem for p in (CONF / "experiment").glob("mini_*.yaml"))

# experiment -> (paper table, the stand-in mapping make_tables gets, the cells (row, column) its runs must fill,
#               seeds per cell)
LLM_1B = {"llama3_2_1b": "smollm2_135m"}
LLM_7B = {"llama2_7b": "smollm2_135m"}
EXPECTED = {
    "mini_table1": ("table1", {"vit_b": "vit_fmnist"},
                    [(f"ViT-B/16 {p}", c) for p in ("2:4", "4:8")
                     for c in ("dense", "Wanda", "CP", "CP (RIA's permutation)", "RIA", "learned")], 3),
    "mini_table2": ("table2", LLM_1B, [("LLaMA-3.2-1B", c) for c in ("dense", "magnitude", "SparseGPT", "Wanda", "CP",
                                                                    "CP (RIA's permutation)", "RIA", "learned")], 1),
    "mini_table5_groups": ("table5_groups", LLM_7B, [("LLaMA-2-7B 2:4", f"G={g}") for g in (1, 2, 4, 8, 16)], 1),
    "mini_table6_pruners": ("table6_pruners", LLM_7B, [(r, c) for r in ("magnitude", "Wanda", "RIA", "SparseGPT")
                                                       for c in ("without", "with")], 1),
    "mini_table7_loss": ("table7_loss", LLM_1B, [("LLaMA-3.2-1B 2:4", c)
                                                 for c in ("CE only", "distillation only", "both")], 1),
    "mini_epochs": ("epochs", LLM_7B, [("LLaMA-2-7B 2:4", c) for c in ("0", "1", "2", "5")], 1),
}


def test_there_is_one_miniature_per_paper_table():
    assert sorted(EXPECTED) == MINI
    # Table 3 has none: no vision-language model with trained weights is offline (the tiny one is random)
    assert sorted(t for t, *_ in EXPECTED.values()) == sorted(t.key for t in paper.TABLES if t.key != "table3")


def _record(cfg) -> RunRecord:
    """The record a job of the sweep writes, with a metric value in every phase it evaluates (the values are not
    the point here; which cells the record lands in is)."""
    names = ["top1", "top5"] if cfg.dataset.task == "image_classification" else [
        f"ppl_{d}" for d in (*cfg.dataset.datamodule.held_out, *cfg.dataset.datamodule.sources)]
    values = dict.fromkeys(names, 1.0)
    metrics = {"pruned": values}
    if cfg.eval.dense_baseline:
        metrics["dense"] = values
    if cfg.eval.identity_baseline and cfg.perm.name != "none":
        metrics["identity"] = values
    return RunRecord(config=OmegaConf.to_container(cfg, resolve=True), model=cfg.model.name, dataset=cfg.dataset.name,
                     pattern=cfg.sparsity.name, pruner=cfg.pruner.name, perm=cfg.perm.name, seed=int(cfg.seed),
                     protocol={}, versions={}, command="", metrics=metrics, efficacy={}, kept_ratio={},
                     perm_seconds={}, learning=None, timings={})


@pytest.mark.parametrize("experiment", MINI)
def test_each_miniature_runs_offline_and_fills_its_table(experiment, tmp_path):
    key, models, cells, seeds = EXPECTED[experiment]
    cfgs = [compose_cfg(job, tmp_path) for job in _jobs(experiment)]
    for cfg in cfgs:
        validate_config(cfg)  # offline: the embedded models and data only, nothing from the hub
        assert cfg.experiment_name == experiment
    runs = [Run(tmp_path / str(i), _record(cfg)) for i, cfg in enumerate(cfgs)]
    table = paper.table(key)
    filled = {(c.row, c.column): c.n for c in fill(table, runs, models) if c.metric == table.metrics[0]}
    assert {cell: filled[cell] for cell in cells} == dict.fromkeys(cells, seeds)
    others = {cell: n for cell, n in filled.items() if cell not in cells}
    assert not any(others.values()), others  # nothing lands in a cell the miniature does not stand in for
    if cfgs[0].dataset.task != "image_classification":  # the LLM tables read the held-out pydoc perplexity first
        first = next(k for k in _record(cfgs[0]).metrics["pruned"] if k.startswith("ppl"))
        assert first == "ppl_pydoc"


def test_the_llm_miniatures_share_one_protocol(tmp_path):
    seen = set()
    for experiment in (e for e in MINI if e != "mini_table1"):
        for job in _jobs(experiment):
            cfg = compose_cfg(job, tmp_path)
            seen.add((cfg.model.name, cfg.dataset.name, cfg.sparsity.name, cfg.learning.batch_size))
            if cfg.perm.name == "learned":  # the paper's method, at this package's rate
                assert (cfg.perm.method.base, cfg.perm.method.mask_grad, cfg.perm.method.init,
                        cfg.perm.optimizer.lr) == ("none", False, "identity", 0.01)
    assert seen == {("smollm2_135m", "mixture", "2:4", 2)}
    steps = {tuple(job[1:]): compose_cfg(job, tmp_path).learning for job in _jobs("mini_epochs")}
    assert [math.ceil(v.train_samples / v.batch_size) * v.max_epochs for v in steps.values()] == [24, 48, 120]


def test_the_miniature_tables_are_committed_beside_their_commands():
    """Each committed miniature table (results/mini/<table>/tables/) comes with the command that made it."""
    root = Path(__file__).resolve().parents[1] / "results" / "mini"
    for folder in sorted(root.glob("*/tables")) if root.exists() else []:
        readme = folder.parent / "README.md"
        assert readme.exists(), f"{folder.parent}: no README.md with the command"
        assert "python train.py -m experiment=mini_" in readme.read_text(encoding="utf-8")
