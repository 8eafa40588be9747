"""The paper's tables from run folders (permsparse.paper, permsparse.tables, scripts/make_tables.py): the paper's
numbers and ours land in the right cells, ablation runs stay out of the main tables, and the files are written."""

from __future__ import annotations

import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from permsparse import paper
from permsparse.runs import RunRecord
from permsparse.tables import Cell, fill, gather, make_tables, markdown, mean_sem, plot_metrics

SEVEN = {f"{t}/acc": 0.5 for t in paper.ZEROSHOT_TASKS}


def _write(root: Path, name: str, model: str, pruner: str, perm: str, seed: int = 0, pattern: str = "2:4", *,
           dense: dict[str, float] | None = None, identity: dict[str, float] | None = None,
           pruned: dict[str, float], perm_cfg: dict[str, Any] | None = None, epochs: int = 20,
           history: list[dict[str, float]] | None = None) -> Path:
    """A run folder with a results.json as train.py writes it (only the fields the tables read are realistic)."""
    perm_node: dict[str, Any] = {"name": perm, "foldable": False, "residual": "per_layer"}
    if perm == "learned":
        perm_node.update(task_weight=1.0, alpha=1e-5, method={"groups": 4, "init": "identity"})
    for key, value in (perm_cfg or {}).items():
        node = perm_node
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    metrics = {"dense": dense or {}, "pruned": pruned}
    if identity is not None:
        metrics["identity"] = identity
    if not metrics["dense"]:
        del metrics["dense"]
    learning = {"history": history, "best_val_loss": min(h["val_loss"] for h in history)} if history else None
    groups = ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2"]
    record = RunRecord(
        config={"model": {"name": model}, "perm": perm_node, "learning": {"max_epochs": epochs}},
        model=model, dataset="imagenet" if model.startswith("vit") else "wikitext2", pattern=pattern, pruner=pruner,
        perm=perm, seed=seed, protocol={}, versions={}, command="python train.py", metrics=metrics,
        efficacy={"mean": 0.2, "per_group": {g: 0.1 * (i + 1) * (perm != "learned") for i, g in enumerate(groups)}},
        kept_ratio={"mean": 1.01, "per_group": {}}, perm_seconds={}, learning=learning, timings={"prune": 1.0})
    run_dir = root / name
    run_dir.mkdir(parents=True)
    record.write(run_dir)
    return run_dir


def _cells(cells: list[Cell]) -> dict[tuple[str, str, str], Cell]:
    return {(c.row, c.column, c.metric): c for c in cells}


def _md_cell(text: str, row: str, column: str, table: paper.PaperTable, block: int = 0) -> str:
    """The text of one cell of the Markdown table (``block``: which metric's table)."""
    header = "| | " + " | ".join(c.name for c in table.columns) + " |"
    start = [i for i, line in enumerate(text.splitlines()) if line == header][block]
    for line in text.splitlines()[start + 2:]:
        parts = [p.strip() for p in line.strip("|").split("|")]
        if parts[0].startswith(row):
            return parts[1 + [c.name for c in table.columns].index(column)]
    raise AssertionError(f"no row {row}")


def test_the_papers_numbers_sit_in_their_cells_with_no_runs():
    t1 = _cells(fill(paper.table("table1"), []))
    assert t1[("ViT-B/16 2:4", "learned", "top1")].paper == 67.9
    assert t1[("ViT-B/16 2:4", "Wanda", "top5")].paper == 86.4
    assert t1[("ViT-B/16 4:8", "RIA", "top1")].paper == 71.4
    assert t1[("ViT-L/14 2:4", "dense", "top5")].paper == 97.9
    assert t1[("ViT-L/14 4:8", "CP", "top1")].paper == 82.0
    assert t1[("ViT-B/16 4:8", "dense", "top1")].paper is None  # the paper gives none
    assert t1[("ViT-B/16 2:4", "CP (RIA's permutation)", "top1")].paper is None  # ours only
    assert all(c.n == 0 and math.isnan(c.mean) for c in t1.values())
    t2 = _cells(fill(paper.table("table2"), []))
    assert t2[("LLaMA-3.2-1B", "magnitude", "ppl")].paper == 4808
    assert t2[("LLaMA-3.2-1B", "SparseGPT", "zeroshot")].paper == 36.35
    assert t2[("LLaMA-2-7B", "learned", "zeroshot")].paper == 46.17
    assert t2[("LLaMA-2-7B", "CP", "ppl")].paper == 10.68
    assert t2[("LLaMA-2-7B", "RIA", "ppl")].paper == 10.52
    assert _cells(fill(paper.table("table5_groups"), []))[("LLaMA-2-7B 2:4", "G=16", "ppl")].paper == 10.63
    assert _cells(fill(paper.table("epochs"), []))[("LLaMA-2-7B 2:4", "0", "ppl")].paper == 11.38
    assert _cells(fill(paper.table("epochs"), []))[("LLaMA-2-7B 2:4", "10", "ppl")].paper == 10.21
    t6 = _cells(fill(paper.table("table6_pruners"), []))
    assert (t6[("magnitude", "without", "ppl")].paper, t6[("magnitude", "with", "ppl")].paper) == (52.00, 45.82)
    assert t6[("RIA", "with", "ppl")].paper == 10.02
    t7 = _cells(fill(paper.table("table7_loss"), []))
    assert [t7[("LLaMA-3.2-1B 2:4", c, "ppl")].paper for c in ("CE only", "distillation only", "both")] == [
        46.15, 52.58, 45.32]
    text = markdown(paper.table("table2"), fill(paper.table("table2"), []))
    assert _md_cell(text, "LLaMA-3.2-1B", "learned", paper.table("table2")) == "– / 45.32"
    assert _md_cell(text, "LLaMA-2-7B", "magnitude", paper.table("table2"), block=1) == "– / 43.84"
    with pytest.raises(KeyError, match="no paper table 'table4'"):
        paper.table("table4")


def _vit_sweep(root: Path) -> Path:
    base = dict(dense={"top1": 79.0})
    _write(root, "0_greedy", "vit_b", "wanda", "greedy", 0, identity={"top1": 60.0}, pruned={"top1": 70.0}, **base)
    _write(root, "1_greedy", "vit_b", "wanda", "greedy", 1, identity={"top1": 62.0}, pruned={"top1": 72.0}, **base)
    _write(root, "2_cp_ria", "vit_b", "wanda", "ria", 0, identity={"top1": 60.0}, pruned={"top1": 69.0}, **base)
    _write(root, "3_ria", "vit_b", "ria", "ria", 0, identity={"top1": 64.0}, pruned={"top1": 75.0}, **base)
    _write(root, "4_learned", "vit_b", "wanda", "learned", 0, identity={"top1": 60.0}, pruned={"top1": 77.0},
           history=[{"step": 0, "val_loss": 1.0}, {"step": 10, "val_loss": 0.8}], **base)
    _write(root, "5_learned_48", "vit_b", "wanda", "learned", 0, "4:8", identity={"top1": 66.0},
           pruned={"top1": 71.0}, history=[{"step": 0, "val_loss": 0.9}, {"step": 10, "val_loss": 0.7}], **base)
    # settings the table does not hold: they must not land in its cells
    _write(root, "6_greedy_foldable", "vit_b", "wanda", "greedy", 0, identity={"top1": 60.0}, pruned={"top1": 1.0},
           perm_cfg={"foldable": True}, **base)
    _write(root, "7_learned_g8", "vit_b", "wanda", "learned", 0, identity={"top1": 60.0}, pruned={"top1": 2.0},
           perm_cfg={"method.groups": 8}, **base)
    _write(root, "8_learned_ce", "vit_b", "wanda", "learned", 0, identity={"top1": 60.0}, pruned={"top1": 3.0},
           perm_cfg={"alpha": 0.0}, **base)
    _write(root, "9_learned_package_default", "vit_b", "wanda", "learned", 0, identity={"top1": 60.0},  # not the paper's
           pruned={"top1": 4.0}, perm_cfg={"method.base": "ria", "method.mask_grad": True}, **base)
    return root


def test_our_runs_land_in_their_cells_with_mean_and_error_over_seeds(tmp_path):
    runs = gather([_vit_sweep(tmp_path / "sweep")])
    table = paper.table("table1")
    cells = _cells(fill(table, runs))
    cp = cells[("ViT-B/16 2:4", "CP", "top1")]
    assert (cp.mean, cp.n) == (71.0, 2) and cp.sem == pytest.approx(1.0)
    assert cp.paper == 66.2 and cp.metric_key == "top1" and cp.warning is None
    wanda = cells[("ViT-B/16 2:4", "Wanda", "top1")]  # identity phase: one per seed, from any Wanda run
    assert (wanda.mean, wanda.n) == (61.0, 2)
    assert cells[("ViT-B/16 2:4", "dense", "top1")].mean == 79.0
    assert cells[("ViT-B/16 2:4", "CP (RIA's permutation)", "top1")].mean == 69.0
    assert cells[("ViT-B/16 2:4", "RIA", "top1")].mean == 75.0
    learned = cells[("ViT-B/16 2:4", "learned", "top1")]
    assert (learned.mean, learned.n) == (77.0, 1)  # not G = 8 (2.0), not CE only (3.0), not perm=learned (4.0)
    assert learned.warning is None  # no second run of its seed matched
    assert learned.runs == (str((tmp_path / "sweep" / "4_learned").resolve()),)
    assert cells[("ViT-B/16 4:8", "learned", "top1")].mean == 71.0
    assert cells[("ViT-B/16 4:8", "Wanda", "top1")].mean == 66.0
    assert cells[("ViT-L/14 2:4", "learned", "top1")].n == 0
    assert cells[("ViT-B/16 2:4", "learned", "top5")].n == 0  # no top-5 in these runs
    text = markdown(table, list(cells.values()))
    assert _md_cell(text, "ViT-B/16 2:4", "CP", table) == "71.00 ± 1.00 / 66.20"
    assert _md_cell(text, "ViT-B/16 2:4", "learned", table) == "77.00 / 67.90"
    assert _md_cell(text, "ViT-B/16 2:4", "CP (RIA's permutation)", table) == "69.00"
    assert _md_cell(text, "ViT-L/14 2:4", "RIA", table) == "– / 79.60"


def test_llm_tables_read_perplexity_the_seven_task_mean_and_the_ablated_setting(tmp_path):
    root = tmp_path / "llm"
    dense = {"ppl_wikitext2": 5.0, **SEVEN}
    _write(root, "a", "llama2_7b", "magnitude", "learned", identity={"ppl_wikitext2": 52.0}, dense=dense,
           pruned={"ppl_wikitext2": 40.0})
    _write(root, "b", "llama2_7b", "wanda", "learned", identity={"ppl_wikitext2": 11.0, **SEVEN}, dense=dense,
           pruned={"ppl_wikitext2": 10.0, **{k: 0.6 for k in SEVEN}})
    _write(root, "c", "llama2_7b", "wanda", "learned", identity={"ppl_wikitext2": 11.0}, dense=dense,
           pruned={"ppl_wikitext2": 10.5}, perm_cfg={"method.groups": 16})
    _write(root, "d", "llama2_7b", "wanda", "learned", identity={"ppl_wikitext2": 11.0}, dense=dense,
           pruned={"ppl_wikitext2": 10.9}, epochs=2)
    _write(root, "e", "llama2_7b", "sparsegpt", "none", dense=dense, pruned={"ppl_wikitext2": 10.3, "mmlu/acc": 0.3})
    runs = gather([root])
    t2 = _cells(fill(paper.table("table2"), runs))
    assert t2[("LLaMA-2-7B", "magnitude", "ppl")].mean == 52.0  # the magnitude pruner's identity phase
    assert t2[("LLaMA-2-7B", "SparseGPT", "ppl")].mean == 10.3  # perm=none: its pruned phase is the identity
    assert t2[("LLaMA-2-7B", "SparseGPT", "zeroshot")].n == 0  # one task of seven: no mean
    assert t2[("LLaMA-2-7B", "learned", "zeroshot")].mean == pytest.approx(60.0)
    assert t2[("LLaMA-2-7B", "dense", "zeroshot")].mean == pytest.approx(50.0)
    assert t2[("LLaMA-2-7B", "learned", "ppl")].metric_key == "ppl_wikitext2"
    # the 2-epoch run is also learned, G = 4, both terms: Table 2 reports both and says so
    learned = t2[("LLaMA-2-7B", "learned", "ppl")]
    assert learned.mean == 10.0 and learned.warning and "2 runs of seed 0" in learned.warning
    t5 = _cells(fill(paper.table("table5_groups"), runs))
    assert t5[("LLaMA-2-7B 2:4", "G=16", "ppl")].mean == 10.5 and t5[("LLaMA-2-7B 2:4", "G=8", "ppl")].n == 0
    epochs = _cells(fill(paper.table("epochs"), runs))
    assert epochs[("LLaMA-2-7B 2:4", "2", "ppl")].mean == 10.9
    assert epochs[("LLaMA-2-7B 2:4", "0", "ppl")].mean == 11.0  # Wanda, the identity phase
    assert epochs[("LLaMA-2-7B 2:4", "20", "ppl")].mean == 10.0
    t6 = _cells(fill(paper.table("table6_pruners"), runs))
    assert (t6[("magnitude", "without", "ppl")].mean, t6[("magnitude", "with", "ppl")].mean) == (52.0, 40.0)
    assert t6[("SparseGPT", "without", "ppl")].mean == 10.3 and t6[("SparseGPT", "with", "ppl")].n == 0


def test_a_stand_in_model_fills_a_paper_row_and_says_so(tmp_path):
    _write(tmp_path / "s", "r", "smollm2_135m", "wanda", "greedy", dense={"ppl_shakespeare": 44.0},
           identity={"ppl_shakespeare": 150.0}, pruned={"ppl_shakespeare": 115.0, "ppl_pydoc": 90.0})
    runs = gather([tmp_path / "s"])
    table = paper.table("table2")
    assert not any(c.n for c in fill(table, runs))
    cells = fill(table, runs, {"llama3_2_1b": "smollm2_135m"})
    cp = _cells(cells)[("LLaMA-3.2-1B", "CP", "ppl")]
    assert (cp.mean, cp.metric_key, cp.stand_in, cp.paper) == (115.0, "ppl_shakespeare", "smollm2_135m", 68.17)
    text = markdown(table, cells)
    assert "| LLaMA-3.2-1B (ours: smollm2_135m) |" in text and "read from ppl_shakespeare" in text
    assert "`python train.py -m experiment=mini_table2` (offline miniature)" in text
    assert "experiment=paper_table2`" in markdown(table, fill(table, runs))  # without stand-ins: the paper's


def test_make_tables_writes_markdown_csv_and_the_three_plots(tmp_path):
    sweep = _vit_sweep(tmp_path / "sweep")
    written = make_tables([sweep], tmp_path / "out")
    assert list(written) == ["table1"]  # no run of any other table
    names = sorted(p.name for p in written["table1"])
    assert names == ["table1.csv", "table1.md", "table1_curves.png", "table1_efficacy.png", "table1_metrics.png"]
    for png in (p for p in written["table1"] if p.suffix == ".png"):
        assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(tmp_path / "out" / "table1.csv", encoding="utf-8")))
    assert len(rows) == 4 * 6 * 2
    cp = next(r for r in rows if (r["row"], r["column"], r["metric"]) == ("ViT-B/16 2:4", "CP", "top1"))
    assert (float(cp["ours"]), float(cp["paper"]), int(cp["n"])) == (71.0, 66.2, 2)
    assert cp["runs"] == "../sweep/0_greedy ../sweep/1_greedy"  # relative to the tables
    assert "ViT-B/16 2:4" in (tmp_path / "out" / "tables.md").read_text()
    forced = make_tables([sweep], tmp_path / "forced", keys=["table7_loss"])
    assert list(forced) == ["table7_loss"]  # written on request, though empty: no plots then
    assert sorted(p.name for p in forced["table7_loss"]) == ["table7_loss.csv", "table7_loss.md"]


def test_a_rerun_in_another_sweep_folder_writes_the_same_table_files(tmp_path):
    """Tables written inside each sweep name its runs relative to themselves: a rerun of the same runs in a folder
    of another date gives byte-identical Markdown and CSV (how the offline miniatures are checked)."""
    texts = []
    for date in ("2026-01-01_00-00-00", "2026-02-02_00-00-00"):
        sweep = _vit_sweep(tmp_path / date)
        make_tables([sweep], sweep / "tables")
        texts.append([(sweep / "tables" / name).read_bytes() for name in ("table1.md", "table1.csv", "tables.md")])
    assert texts[0] == texts[1]
    assert b"../0_greedy ../1_greedy" in texts[0][1]


def test_the_metric_plot_spans_the_values_not_zero(tmp_path, monkeypatch):
    import matplotlib.axes

    limits: list[tuple[float, float]] = []
    original = matplotlib.axes.Axes.set_xlim
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlim",
                        lambda self, *a, **k: limits.append(a) or original(self, *a, **k))
    runs = gather([_vit_sweep(tmp_path / "sweep")])
    table = paper.table("table1")
    assert plot_metrics(table, fill(table, runs), tmp_path / "m.png") is not None
    lo, hi = next(a for a in limits if len(a) == 2)  # our call; matplotlib's own pass one tuple
    assert 55 < lo < 61 and 79 < hi < 83  # ours 60..79 and the paper's 65.8..79.1, not 0..85


def test_mean_sem_drops_nans_and_gives_zero_error_for_one_value():
    mean, sem = mean_sem([])
    assert math.isnan(mean) and sem == 0.0
    assert mean_sem([2.0, math.nan]) == (2.0, 0.0)
    mean, sem = mean_sem([1.0, 3.0])
    assert mean == 2.0 and sem == pytest.approx(1.0)


def test_the_script_prints_the_tables_and_fails_in_one_line_on_a_non_run_folder(tmp_path):
    sweep = _vit_sweep(tmp_path / "sweep")
    proc = subprocess.run([sys.executable, "scripts/make_tables.py", str(sweep), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "71.00 ± 1.00 / 66.20" in proc.stdout and (tmp_path / "o" / "table1_metrics.png").is_file()
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "scripts/make_tables.py", str(tmp_path / "empty")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'} holds no results.json: not a run or sweep folder"]


def test_only_filled_leaves_out_rows_and_metrics_without_runs(tmp_path):
    runs = gather([_vit_sweep(tmp_path / "sweep")])
    table = paper.table("table1")
    text = markdown(table, fill(table, runs), only_filled=True)
    assert "ViT-B/16 2:4" in text and "ViT-B/16 4:8" in text
    assert "| ViT-L/14" not in text and "**top-5" not in text


def test_compare_logs_its_table_and_plot_to_an_offline_wandb_run(tmp_path, monkeypatch):
    import json
    import shutil

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    shutil.copytree(ROOT / "results" / "vit_fmnist_2-4_wanda", sweep, ignore=shutil.ignore_patterns("*.png", "*.csv"))
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import compare
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert compare.main([str(sweep), "--wandb", "vit_group"]) == 0
    import wandb

    wandb.teardown()  # wait until W&B's service has written the run file (it failed twice in full runs, not alone)
    from helpers.wandb_offline import iter_records

    run_dirs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    records = list(iter_records(next(run_dirs[0].glob("run-*.wandb"))))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type) == ("vit_group", "compare")
    logged = {item.key or item.nested_key[0] for r in records if r.WhichOneof("record_type") == "history"
              for item in r.history.item}
    assert {"tables/compare", "plots/compare"} <= logged
    table = json.loads(next(run_dirs[0].glob("files/media/table/tables/compare_*.table.json")).read_text())
    with open(sweep / "compare.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert table["columns"] == rows[0] and len(table["data"]) == len(rows) - 1 == 17
    col = rows[0].index("top1")
    assert [r[col] for r in table["data"]] == [float(r[col]) for r in rows[1:]]  # numbers, so W&B can plot them
    assert list(run_dirs[0].glob("files/media/images/plots/compare_*.png"))


def _seeds_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import seeds

    return seeds


def _overrides(run_dir: Path, *words: str) -> None:
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {w}\n" for w in words))


def test_seeds_pools_a_setting_over_seeds_and_measures_its_lead_over_the_best_heuristic(tmp_path, capsys):
    seeds = _seeds_module()
    top1 = {"ria": [80.0, 81.0, 82.0], "greedy": [81.0, 82.5, 81.5], "learned": [82.0, 83.0, 84.0],
            "none": [70.0, 71.0, 72.0]}
    for perm, values in top1.items():
        for seed, value in enumerate(values):
            history = [{"step": 1, "val_loss": 0.5 - 0.01 * seed}] if perm == "learned" else None
            run = _write(tmp_path / "sweep", f"{perm}_{seed}", "vit_fmnist", "wanda", perm, seed,
                         pruned={"top1": value}, history=history)
            _overrides(run, "experiment=vit_fmnist", f"perm={perm}", f"seed={seed}")
    rows, metric, reference = seeds.table(seeds.collect(seeds.load_folders([tmp_path])))
    assert metric == "top1" and reference == "greedy"  # best mean among ria (81.0) and greedy (81.67); none skipped
    by = {r["setting"]: r for r in rows}
    assert [r["setting"] for r in rows] == ["learned", "greedy", "ria", "none"]
    assert by["learned"]["top1"]["mean"] == pytest.approx(83.0) and by["learned"]["top1"]["sd"] == pytest.approx(1.0)
    assert by["learned"]["val_loss"] == pytest.approx(0.49)
    assert by["greedy"]["lead"] is None and math.isnan(by["ria"]["val_loss"])
    lead = by["learned"]["lead"]
    se_l, se_g = 1.0 / math.sqrt(3), statistics.stdev(top1["greedy"]) / math.sqrt(3)
    assert lead["diff"] == pytest.approx(83.0 - sum(top1["greedy"]) / 3)
    assert lead["unpaired_z"] == pytest.approx(lead["diff"] / math.sqrt(se_l ** 2 + se_g ** 2))
    diffs = [a - b for a, b in zip(top1["learned"], top1["greedy"], strict=True)]  # 1.0, 0.5, 2.5
    assert lead["paired_z"] == pytest.approx(statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(3)))
    assert seeds.main([str(tmp_path), "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "lead on top1 over 'greedy'" in out and "over 2 seeds" in out


def test_seeds_splits_one_setting_run_twice_per_seed_by_its_folder_and_ranks_perplexity_lower_first(tmp_path):
    seeds = _seeds_module()
    for sweep, ppl in (("old", 90.0), ("new", 80.0)):  # the same command before and after a default changed
        for seed in (0, 1):
            run = _write(tmp_path / sweep, f"learned_{seed}", "smollm2", "wanda", "learned", seed,
                         pruned={"ppl_pydoc": ppl + seed}, history=[{"step": 1, "val_loss": 4.0}])
            _overrides(run, "dataset=mixture", f"seed={seed}")
    groups = seeds.collect(seeds.load_folders([tmp_path]))
    assert sorted(groups) == ["learned [new]", "learned [old]"]
    rows, metric, reference = seeds.table(groups)
    assert metric == "ppl_pydoc" and reference is None  # no heuristic to compare against
    assert [r["setting"] for r in rows] == ["learned [new]", "learned [old]"]  # lower perplexity first


def test_seeds_compares_best_validation_losses_paired_by_seed(tmp_path, capsys):
    """The validation windows follow the seed, so seed 2's losses are all lower here; the paired difference still
    ranks the setting that is lower at every seed first."""
    seeds = _seeds_module()
    losses = {"calibration.samples=128": [4.30, 4.25, 4.05], "calibration.samples=32": [4.36, 4.30, 4.14],
              "calibration.samples=8": [4.34, 4.35, 4.16]}
    for setting, values in losses.items():
        for seed, loss in enumerate(values):
            run = _write(tmp_path / "sweep", f"{setting}_{seed}", "smollm2", "wanda", "learned", seed,
                         pruned={"ppl_pydoc": 60.0}, history=[{"step": 1, "val_loss": loss + 0.1},
                                                              {"step": 2, "val_loss": loss}])
            _overrides(run, "dataset=mixture", setting, f"seed={seed}")
    run = _write(tmp_path / "sweep", "ria_0", "smollm2", "wanda", "ria", 0, pruned={"ppl_pydoc": 70.0})
    _overrides(run, "dataset=mixture", "perm=ria", "seed=0")
    groups = seeds.collect(seeds.load_folders([tmp_path]))
    leads = seeds.val_leads(groups, "learned calibration.samples=32")
    assert [r["setting"] for r in leads] == ["learned calibration.samples=128", "learned calibration.samples=8"]
    best = leads[0]
    assert best["per_seed"] == pytest.approx({0: 0.06, 1: 0.05, 2: 0.09}) and best["seeds"] == [0, 1, 2]
    assert best["z"] == pytest.approx(statistics.mean([0.06, 0.05, 0.09]) / (statistics.stdev([0.06, 0.05, 0.09]) / math.sqrt(3)))
    assert leads[1]["mean"] == pytest.approx((0.02 - 0.05 - 0.02) / 3)  # lower at seed 0 only: negative
    with pytest.raises(SystemExit, match="has no learned run"):
        seeds.val_leads(groups, "ria")
    assert seeds.main([str(tmp_path), "--val-reference", "learned calibration.samples=32"]) == 0
    out = capsys.readouterr().out
    assert "best validation loss, paired by seed, against 'learned calibration.samples=32'" in out
    assert "+0.0667" in out and "per seed +0.0600 / +0.0500 / +0.0900" in out
