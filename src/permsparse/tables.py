"""Comparison tables and plots from run folders: the helpers ``scripts/compare.py`` and ``scripts/make_tables.py``
share, and the paper's tables (:mod:`permsparse.paper`) filled with our runs beside the paper's numbers.

Everything is read from ``results.json`` through :class:`permsparse.runs.RunRecord` (docs/run-format.md); nothing
is scraped from logs. A cell's value is the mean over seeds with its standard error (one run per seed: several runs
of one seed in one cell are reported, and the first by folder name is used). ``models`` maps a paper model's
config name to the model whose runs stand in for it (``{"llama3_2_1b": "smollm2_135m"}``: an offline miniature in
the paper's layout); such rows say so, and their plots leave out the paper's numbers, which belong to another model.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from permsparse.paper import CITATION, MISSING_DEFAULTS, TABLES, ZEROSHOT_TASKS, Column, PaperTable, Row
from permsparse.runs import RunRecord, find_runs

__all__ = ["mean_sem", "main_metric", "gap_closed", "phase_metrics", "Run", "Cell", "gather", "config_value", "matches",
           "metric_value", "matched", "fill", "markdown", "write_csv", "plot_metrics", "plot_curves",
           "plot_efficacy", "make_tables", "log_to_wandb"]

_RECORD_FIELDS = ("model", "dataset", "pattern", "pruner", "perm", "seed")
_ABSENT = object()


def mean_sem(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value); NaNs dropped; ``(nan, 0)`` for none."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if not vals:
        return math.nan, 0.0
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var / len(vals))


def main_metric(metrics: Mapping[str, float]) -> str:
    """The headline metric of a phase: the first perplexity if any (lower is better), else the first metric."""
    keys = list(metrics)
    return next((k for k in keys if k.startswith("ppl")), keys[0])


def gap_closed(dense: float, identity: float, method: float, log_scale: bool) -> float:
    """Share of the identity-to-dense gap closed by the method (log-perplexity for perplexities)."""
    f = math.log if log_scale else (lambda x: x)
    denom = f(identity) - f(dense)
    return float("nan") if denom == 0 else (f(identity) - f(method)) / denom


@dataclass(frozen=True)
class Run:
    """A run folder and its record."""

    dir: Path
    record: RunRecord


def gather(paths: Iterable[str | Path]) -> list[Run]:
    """Every run at or below the given folders (a run folder, a sweep folder, a folder of sweeps), each once,
    sorted by folder. A path that is not a folder, or holds no run, is an error naming it."""
    dirs: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder")
        found = find_runs(path)
        if not found:
            raise FileNotFoundError(f"{path} holds no results.json: not a run or sweep folder")
        dirs.update(dict.fromkeys(p.resolve() for p in found))
    return [Run(d, RunRecord.read(d)) for d in sorted(dirs)]


def config_value(record: RunRecord, path: str) -> Any:
    """A record field (``model``, ``pattern``, ``pruner``, ``perm``, ...) or a dotted path into the run's resolved
    config; a path the run predates reads as :data:`permsparse.paper.MISSING_DEFAULTS` gives it."""
    if path in _RECORD_FIELDS:
        return getattr(record, path)
    node: Any = record.config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING_DEFAULTS.get(path, _ABSENT)
        node = node[part]
    return node


def _equal(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(value, bool):
        return value is wanted
    if isinstance(wanted, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(float(value), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    return value == wanted


def matches(record: RunRecord, match: Mapping[str, Any]) -> bool:
    """Whether every key of ``match`` (record fields, dotted config paths) has the given value in the run."""
    return all(_equal(config_value(record, key), wanted) for key, wanted in match.items())


def phase_metrics(metrics: Mapping[str, Any], perm: str, phase: str) -> Any:
    """One phase's metrics of a run (``results.json``'s ``metrics[phase]``), or None; the ``identity`` phase of a
    ``perm=none`` run is its ``pruned`` phase (the same model), which such runs do not record twice."""
    found = metrics.get(phase)
    if found is None and phase == "identity" and perm == "none":
        found = metrics.get("pruned")
    return found


def metric_value(record: RunRecord, phase: str, metric: str) -> tuple[float, str] | None:
    """``(value, metric key)`` of a table metric in one phase of a run, or None when the run lacks it.

    ``identity`` of a ``perm=none`` run is its ``pruned`` phase (the same thing). ``ppl`` is the phase's first
    perplexity; ``zeroshot`` the mean ``acc`` over the paper's seven tasks in percent (all seven needed); ``mmmu``
    the ``mmmu_val`` accuracy in percent."""
    metrics = phase_metrics(record.metrics, record.perm, phase)
    if not metrics:
        return None
    if metric == "ppl":
        key = next((k for k in metrics if k.startswith("ppl")), None)
        return None if key is None else (float(metrics[key]), key)
    if metric == "zeroshot":
        accs = [metrics.get(f"{task}/acc") for task in ZEROSHOT_TASKS]
        if any(a is None for a in accs):
            return None
        return 100.0 * sum(float(a) for a in accs if a is not None) / len(accs), f"mean acc of {len(accs)} tasks"
    if metric == "mmmu":
        acc = metrics.get("mmmu_val/acc")
        return None if acc is None else (100.0 * float(acc), "mmmu_val/acc")
    return (float(metrics[metric]), metric) if metric in metrics else None


def _row_match(row: Row, models: Mapping[str, str] | None) -> dict[str, Any]:
    match = dict(row.match)
    if models and match.get("model") in models:
        match["model"] = models[match["model"]]
    return match


def _stand_in(row: Row, models: Mapping[str, str] | None) -> str | None:
    model = row.match.get("model")
    return models.get(model) if models and model in models else None


def matched(table: PaperTable, runs: Sequence[Run], models: Mapping[str, str] | None = None
            ) -> dict[tuple[str, str], list[list[Run]]]:
    """``{(row, column): [runs of seed s, for each seed]}``: the runs that fill each cell, grouped by seed, each
    group sorted by folder (more than one run per seed means the folders given mix settings the table does not
    tell apart)."""
    out: dict[tuple[str, str], list[list[Run]]] = {}
    for row in table.rows:
        row_match = _row_match(row, models)
        for column in table.columns:
            match = {**row_match, **column.match}
            by_seed: dict[int, list[Run]] = {}
            for run in runs:
                if matches(run.record, match) and (column.phase in run.record.metrics or (
                        column.phase == "identity" and run.record.perm == "none")):
                    by_seed.setdefault(run.record.seed, []).append(run)
            out[(row.name, column.name)] = [by_seed[s] for s in sorted(by_seed)]
    return out


@dataclass(frozen=True)
class Cell:
    """One (row, column, metric) of a paper table: the paper's number and ours (mean and standard error over
    ``n`` seeds, NaN when no run fills it), the metric key it was read from and the run folders used."""

    table: str
    row: str
    column: str
    metric: str
    paper: float | None
    mean: float
    sem: float
    n: int
    metric_key: str
    runs: tuple[str, ...]
    stand_in: str | None = None
    warning: str | None = None


def fill(table: PaperTable, runs: Sequence[Run], models: Mapping[str, str] | None = None) -> list[Cell]:
    """Every cell of ``table`` for every metric, the paper's number beside ours, in row, column, metric order."""
    groups = matched(table, runs, models)
    cells = []
    for row in table.rows:
        stand_in = _stand_in(row, models)
        for column in table.columns:
            seeds = groups[(row.name, column.name)]
            for metric in table.metrics:
                values, keys, used, notes = [], [], [], []
                for group in seeds:
                    read = [(r, metric_value(r.record, column.phase, metric)) for r in group]
                    read = [(r, v) for r, v in read if v is not None]
                    if not read:
                        continue
                    first, (value, key) = read[0]
                    values.append(value)
                    keys.append(key)
                    used.append(str(first.dir))
                    if column.phase == "pruned" and len({v for _, (v, _k) in read}) > 1:
                        notes.append(f"{len(read)} runs of seed {first.record.seed} with different values; "
                                     f"used {first.dir.name}")
                mean, sem = mean_sem(values)
                paper = row.paper.get(column.name, {}).get(metric)
                cells.append(Cell(table.key, row.name, column.name, metric, paper, mean, sem, len(values),
                                  "/".join(dict.fromkeys(keys)), tuple(used), stand_in, "; ".join(notes) or None))
    return cells


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def _cell_text(cell: Cell) -> str:
    ours = _fmt(cell.mean) or "–"
    if cell.n > 1:
        ours += f" ± {_fmt(cell.sem)}"
    return ours if cell.paper is None else f"{ours} / {_fmt(cell.paper)}"


_METRIC_NAMES = {"top1": "top-1 (%)", "top5": "top-5 (%)", "ppl": "perplexity", "zeroshot": "mean accuracy (%)",
                 "mmmu": "MMMU accuracy (%)"}


def markdown(table: PaperTable, cells: Sequence[Cell], only_filled: bool = False) -> str:
    """The table in the paper's layout, one block per metric; each cell ``ours / paper`` (ours: mean ± standard
    error over seeds when there are several). ``only_filled``: leave out the rows and metrics no run fills."""
    by = {(c.row, c.column, c.metric): c for c in cells if c.table == table.key}
    filled = {(c.row, c.metric) for c in by.values() if c.n}
    rows = [r for r in table.rows if not only_filled or any((r.name, m) in filled for m in table.metrics)]
    metrics = [m for m in table.metrics if not only_filled or any((r.name, m) in filled for r in rows)]
    runs = f"`python train.py -m experiment={table.experiment}`"
    if any(c.stand_in for c in cells):  # another model's runs in the paper's rows: the offline miniature's command
        runs = f"`python train.py -m experiment={table.experiment.replace('paper_', 'mini_', 1)}` (offline miniature)"
    lines = [f"## {table.key}: {table.title}", "",
             f"Paper: {CITATION}. Runs: {runs}. Each cell: ours / "
             "the paper's; ours is the mean ± standard error over seeds where there are several; \"–\": no run.", ""]
    if table.note:
        lines += [table.note, ""]
    for metric in metrics:
        keys = sorted({by[(r.name, c.name, metric)].metric_key for r in rows for c in table.columns
                       if by[(r.name, c.name, metric)].n} - {""})
        read = f" (read from {', '.join(keys)})" if keys else ""
        lines += [f"**{_METRIC_NAMES.get(metric, metric)}**{read}", "",
                  "| | " + " | ".join(c.name for c in table.columns) + " |",
                  "|---|" + "---|" * len(table.columns)]
        for row in rows:
            first = by[(row.name, table.columns[0].name, metric)]
            label = row.name + (f" (ours: {first.stand_in})" if first.stand_in else "")
            lines.append(f"| {label} | " + " | ".join(_cell_text(by[(row.name, c.name, metric)])
                                                      for c in table.columns) + " |")
        lines.append("")
    warnings = [f"- {c.row}, {c.column}, {c.metric}: {c.warning}" for c in cells if c.warning and c.table == table.key]
    if warnings:
        lines += ["Warnings:", *warnings, ""]
    return "\n".join(lines)


_CSV_FIELDS = ("table", "row", "column", "metric", "paper", "ours", "sem", "n", "metric_key", "stand_in", "runs",
               "warning")


def write_csv(cells: Sequence[Cell], path: str | Path) -> Path:
    """One line per cell (long format): the paper's number, ours, its standard error, seeds and run folders."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(_CSV_FIELDS)
        for c in cells:
            writer.writerow([c.table, c.row, c.column, c.metric, "" if c.paper is None else c.paper,
                             "" if math.isnan(c.mean) else c.mean, c.sem if c.n else "", c.n, c.metric_key,
                             c.stand_in or "", " ".join(c.runs), c.warning or ""])
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _span(ax: Any, values: Sequence[float], log: bool) -> None:
    """Limit the x axis to the values with a margin (never from 0 unless they reach it), on a log axis for values
    that span more than a factor of 20."""
    lo, hi = min(values), max(values)
    if log and lo > 0 and hi / lo > 20:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.25, hi * 1.25)
        return
    pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 0.02, 0.5)
    ax.set_xlim(lo - pad, hi + pad)


def plot_metrics(table: PaperTable, cells: Sequence[Cell], path: str | Path, dpi: int = 110) -> Path | None:
    """One panel per (metric, row): each column's value, ours as a dot with standard-error bars over seeds and the
    paper's as a diamond, on an axis that spans the values. None (nothing written) when no cell has a value."""
    panels = [(m, r) for m in table.metrics for r in table.rows
              if any(c.n for c in cells if c.metric == m and c.row == r.name)]
    if not panels:
        return None
    plt = _pyplot()
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, (0.9 + 0.4 * len(table.columns)) * nrows),
                             squeeze=False)
    names = [c.name for c in table.columns]
    for k, (metric, row) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        by = {c.column: c for c in cells if c.metric == metric and c.row == row.name}
        shown: list[float] = []
        for j, name in enumerate(names):
            cell = by[name]
            if cell.n:
                ax.errorbar([cell.mean], [j], xerr=[cell.sem] if cell.n > 1 else None, fmt="o", color="C0",
                            capsize=3, label="ours" if not shown else None)
                shown += [cell.mean - cell.sem, cell.mean + cell.sem]
        papers = [(j, by[n].paper) for j, n in enumerate(names) if by[n].paper is not None]
        stand_in = next(iter(by.values())).stand_in
        if papers and not stand_in:
            ax.scatter([p for _, p in papers], [j for j, _ in papers], marker="D", color="k", s=18, zorder=3,
                       label="paper")
            shown += [p for _, p in papers]
        _span(ax, shown, log=metric == "ppl")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        who = f"{row.name} (ours: {stand_in})" if stand_in else row.name
        ax.set_title(f"{who}: {_METRIC_NAMES.get(metric, metric)}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.suptitle(f"{table.key}: ours (mean over seeds, bars: standard error) and the paper's", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def _learned_columns(table: PaperTable) -> list[Column]:
    return [c for c in table.columns if c.phase == "pruned" and c.match.get("perm") == "learned"]


def plot_curves(table: PaperTable, runs: Sequence[Run], path: str | Path,
                models: Mapping[str, str] | None = None, dpi: int = 110) -> Path | None:
    """The learned permutation's validation loss against its step (``learning.history``), one line per run of
    every learned column, one panel per row. None when no such run has a history."""
    groups = matched(table, runs, models)
    panels: list[tuple[Row, list[tuple[str, Run]]]] = []
    for row in table.rows:
        lines = [(column.name, run) for column in _learned_columns(table)
                 for seed_runs in groups[(row.name, column.name)] for run in seed_runs[:1]
                 if (run.record.learning or {}).get("history")]
        if lines:
            panels.append((row, lines))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (row, lines) in zip(axes[0], panels, strict=True):
        for name, run in lines:
            history = run.record.learning["history"]  # type: ignore[index]
            label = name if len(_learned_columns(table)) > 1 else "learned"
            ax.plot([h["step"] for h in history], [h["val_loss"] for h in history], marker=".",
                    label=f"{label}, seed {run.record.seed}")
        stand_in = _stand_in(row, models)
        ax.set_title(f"{row.name} (ours: {stand_in})" if stand_in else row.name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{table.key}: validation loss of the learned permutation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_efficacy(table: PaperTable, runs: Sequence[Run], path: str | Path,
                  models: Mapping[str, str] | None = None, dpi: int = 110) -> Path | None:
    """Per-layer efficacy (``efficacy.per_group``, docs/method.md §5) of every permuted column, mean over seeds,
    one panel per row, the binding groups in layer order. None when no run has one."""
    groups = matched(table, runs, models)
    panels = []
    for row in table.rows:
        lines = []
        for column in table.columns:
            if column.phase != "pruned" or column.match.get("perm") in (None, "none"):
                continue
            seeds = [g[0] for g in groups[(row.name, column.name)] if (g[0].record.efficacy or {}).get("per_group")]
            if seeds:
                names = list(seeds[0].record.efficacy["per_group"])
                means = [mean_sem(r.record.efficacy["per_group"].get(n, math.nan) for r in seeds)[0] for n in names]
                lines.append((column.name, names, means, len(seeds)))
        if lines:
            panels.append((row, lines))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.0, 3.2 * len(panels)), squeeze=False)
    for ax, (row, lines) in zip(axes[:, 0], panels, strict=True):
        for name, _names, means, n in lines:
            ax.plot(range(len(means)), means, marker=".", linewidth=1, label=f"{name} ({n} seed{'s' * (n > 1)})")
        names = lines[0][1]
        step = max(1, len(names) // 16)
        ax.set_xticks(range(0, len(names), step))
        ax.set_xticklabels(names[::step], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("efficacy")
        ax.grid(alpha=0.3)
        stand_in = _stand_in(row, models)
        ax.set_title(f"{row.name} (ours: {stand_in})" if stand_in else row.name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{table.key}: per-layer efficacy of each permutation (0: identity, 1: the row-wise bound)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def make_tables(paths: Iterable[str | Path], out_dir: str | Path, keys: Sequence[str] | None = None,
                models: Mapping[str, str] | None = None) -> dict[str, list[Path]]:
    """Fill the paper's tables from the runs below ``paths`` and write, per table with any run (or per table named
    in ``keys``), ``<key>.md``, ``<key>.csv`` and the plots ``<key>_metrics.png``, ``<key>_curves.png`` (learned
    runs) and ``<key>_efficacy.png`` (permuted runs) into ``out_dir``, plus ``tables.md`` with every table. The CSV
    names run folders relative to ``out_dir``. Returns the files written per table."""
    runs = gather(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [t for t in TABLES if keys is None or t.key in keys]
    unknown = sorted(set(keys or ()) - {t.key for t in TABLES})
    if unknown:
        raise KeyError(f"no paper table {', '.join(unknown)}; choose from {', '.join(t.key for t in TABLES)}")
    written: dict[str, list[Path]] = {}
    texts = []
    for table in chosen:
        # run folders relative to the tables, so that a rerun in another sweep folder writes the same files
        cells = [replace(c, runs=tuple(os.path.relpath(r, out.resolve()) for r in c.runs))
                 for c in fill(table, runs, models)]
        if keys is None and not any(c.n for c in cells):
            continue
        text = markdown(table, cells)
        texts.append(text)
        md = out / f"{table.key}.md"
        md.write_text(text, encoding="utf-8")
        files = [md, write_csv(cells, out / f"{table.key}.csv")]
        for kind, draw in (("metrics", lambda p, t=table, c=cells: plot_metrics(t, c, p)),
                           ("curves", lambda p, t=table: plot_curves(t, runs, p, models)),
                           ("efficacy", lambda p, t=table: plot_efficacy(t, runs, p, models))):
            png = draw(out / f"{table.key}_{kind}.png")
            if png is not None:
                files.append(png)
        written[table.key] = files
    if texts:
        (out / "tables.md").write_text("\n".join(texts), encoding="utf-8")
    return written


def _number_or_text(value: str) -> float | str:
    """A CSV cell as a float where it reads as one (so W&B can plot the column), else the text."""
    try:
        return float(value)
    except ValueError:
        return value


def log_to_wandb(files: Iterable[str | Path], name: str, group: str | None = None, project: str = "permsparse",
                 save_dir: str | Path | None = None, config: Mapping[str, Any] | None = None) -> Path:
    """Log a comparison's files to one W&B run (``job_type="compare"``), so a dashboard shows them unwired: every
    ``.csv`` as a ``wandb.Table`` (``tables/<stem>``), every ``.png`` as an image (``plots/<stem>``).

    ``group`` puts the run beside the runs it compares (they log to the ``experiment_name`` group, conf/logger/
    wandb.yaml). Without ``WANDB_API_KEY`` the run is offline (``wandb sync`` uploads it later), as for training
    runs. Returns the run's local folder.
    """
    import os

    import wandb

    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    files = [Path(f) for f in files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"log_to_wandb: no such file(s): {', '.join(missing)}")
    run = wandb.init(project=project, group=group, name=name, job_type="compare", dir=str(save_dir) if save_dir else None,
                     config=dict(config or {}), reinit="finish_previous")
    try:
        logged: dict[str, Any] = {}
        for path in files:
            if path.suffix == ".csv":
                with open(path, newline="", encoding="utf-8") as f:
                    rows = list(csv.reader(f))
                if rows:
                    data = [[_number_or_text(v) for v in row] for row in rows[1:]]
                    logged[f"tables/{path.stem}"] = wandb.Table(columns=rows[0], data=data)
            elif path.suffix == ".png":
                logged[f"plots/{path.stem}"] = wandb.Image(str(path))
        run.log(logged)
        return Path(run.dir).parent
    finally:
        run.finish()
