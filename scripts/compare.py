"""Side-by-side table and plot of a sweep: ``python scripts/compare.py multirun/<experiment>/<date>``.

Reads every ``results.json`` below the folder (nothing is scraped from logs), prints one row per run
(dense, identity and permuted metrics, the share of the identity-to-dense gap the permutation closes,
mean efficacy and kept-score ratio, time) and writes ``compare.png`` and ``compare.csv`` beside them. Every
domain a run reports (e.g. the held-out domains of ``dataset=mixture``) gets its own pruned-metric and
gap-closed columns; ``variant`` is the run's command-line overrides (what distinguishes two runs of one method).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from permsparse.tables import gap_closed, main_metric, mean_sem, phase_metrics

__all__ = ["load_runs", "load_folders", "variant", "build_rows", "print_table", "plot", "main", "gap_closed", "main_metric"]


def load_runs(root: Path) -> list[dict]:
    """Every run record below ``root`` (:class:`permsparse.runs.RunRecord`, as a dict with its folder)."""
    from permsparse.runs import RunRecord, find_runs

    return [{**RunRecord.read(run_dir).to_dict(), "_path": str(run_dir)} for run_dir in find_runs(root)]


def load_folders(folders: list[Path]) -> list[dict] | None:
    """:func:`load_runs` of every folder, in order; ``None`` (after an error line on stderr) if one is not a folder."""
    runs: list[dict] = []
    for folder in folders:
        if not folder.is_dir():
            print(f"error: {folder} is not a folder", file=sys.stderr)
            return None
        runs += load_runs(folder)
    return runs


_NOT_A_VARIANT = ("hydra.", "progress=", "resume=", "logger=", "save_pruned=", "-m", "--multirun")


def variant(run: dict) -> str:
    """The run's own overrides (Hydra's ``.hydra/overrides.yaml``, else its command line), without those that do
    not change its result."""
    path = Path(run["_path"]) / ".hydra" / "overrides.yaml"
    if path.is_file():
        import yaml

        args = [str(a) for a in yaml.safe_load(path.read_text()) or []]
    else:
        args = run.get("command", "").split()[1:]
    return " ".join(a for a in args if not a.startswith(_NOT_A_VARIANT)) or "(defaults)"


def build_rows(runs: list[dict]) -> tuple[list[dict], str, list[str]]:
    """One row per run; the headline metric; the other domains (metrics) every run reports."""
    if not runs:
        raise SystemExit("no results.json found below that folder")
    metric = main_metric(runs[0]["metrics"]["pruned"])
    is_ppl = metric.startswith("ppl")
    others = [k for k in runs[0]["metrics"]["pruned"] if k != metric and not k.endswith("_stderr")  # zero-shot errors
              and all(k in run["metrics"]["pruned"] for run in runs)]
    rows = []
    for run in runs:
        m = run["metrics"]
        identity_of = phase_metrics(m, run["perm"], "identity") or {}
        dense_of = m.get("dense", {})  # absent in a selection run (eval.dense_baseline=false)
        dense = dense_of.get(metric, float("nan"))
        pruned = m["pruned"][metric]
        identity = identity_of.get(metric, float("nan"))
        row = {
            "model": run["model"], "pattern": run["pattern"], "pruner": run["pruner"], "perm": run["perm"],
            "variant": variant(run), "seed": run["seed"], f"dense_{metric}": dense,
            f"identity_{metric}": identity, metric: pruned, "gap_closed": gap_closed(dense, identity, pruned, is_ppl),
        }
        for key in others:
            row[key] = m["pruned"][key]
            row[f"gap_{key.removeprefix('ppl_')}"] = gap_closed(dense_of.get(key, float("nan")), identity_of.get(key, float("nan")),
                                                                 m["pruned"][key], key.startswith("ppl"))
        row.update({"efficacy": run["efficacy"]["mean"], "kept_ratio": run["kept_ratio"]["mean"],
                    "seconds": sum(run["timings"].values()), "path": run["_path"]})
        rows.append(row)
    order = {"none": 0, "ria": 1, "greedy": 2, "learned": 3, "permllm": 4}
    rows.sort(key=lambda r: (r["model"], r["pattern"], r["pruner"], order.get(r["perm"], 9), r["variant"], r["seed"]))
    return rows, metric, others


def print_table(rows: list[dict], metric: str, others: list[str] | None = None) -> None:
    extra = [c for key in others or [] for c in (key, f"gap_{key.removeprefix('ppl_')}")]
    cols = ["model", "pattern", "pruner", "perm", "variant", "seed", f"dense_{metric}", f"identity_{metric}", metric,
            "gap_closed", *extra, "efficacy", "kept_ratio", "seconds"]
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).rjust(widths[c]) for c in cols))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def _labels(rows: list[dict]) -> dict[int, str]:
    """A short name per row: the method plus the overrides that distinguish it (seeds pooled; words every row
    shares, and the ``perm.method.`` prefix, dropped)."""
    words = {i: [w for w in r["variant"].split() if not w.startswith(("seed=", "perm=", "experiment="))]
             for i, r in enumerate(rows)}
    common = set.intersection(*(set(w) for w in words.values())) if words else set()
    return {i: " ".join([rows[i]["perm"], *(w.removeprefix("perm.method.") for w in ws if w not in common)])
            for i, ws in words.items()}


def plot(rows: list[dict], metric: str, out: Path, others: list[str] | None = None) -> None:
    """One panel per domain: the share of the identity-to-dense gap each method closes (log-perplexity or
    top-1), mean over seeds with standard-error bars, on an axis that spans the values (so 81.0 vs 82.6 top-1
    does not look flat), and a panel of mean efficacy. Where runs have no dense or identity baseline the panel
    shows the raw metric instead. One colour per (model, pattern, pruner)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _labels(rows)
    labels = list(dict.fromkeys(names[i] for i, r in enumerate(rows) if r["perm"] != "none")) or \
        list(dict.fromkeys(names.values()))
    setups = sorted({(r["model"], r["pattern"], r["pruner"]) for r in rows})
    panels = [metric, *(others or []), "efficacy"]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    height = 0.9 + 0.32 * len(labels) * max(1, len(setups) // 2 + 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, height * nrows), squeeze=False)
    bar = 0.8 / max(len(setups), 1)
    for n, panel in enumerate(panels):
        ax = axes[n // ncols][n % ncols]
        gap_key = "gap_closed" if panel == metric else f"gap_{panel.removeprefix('ppl_')}"
        use_gap = panel != "efficacy" and any(not math.isnan(r.get(gap_key, math.nan)) for r in rows)
        field, scale = (gap_key, 100.0) if use_gap else (panel, 1.0)
        lo, hi = math.inf, -math.inf
        for k, setup in enumerate(setups):
            ys, means, errs = [], [], []
            for j, label in enumerate(labels):
                vals = [float(r[field]) for i, r in enumerate(rows)
                        if names[i] == label and (r["model"], r["pattern"], r["pruner"]) == setup]
                mean, sem = mean_sem(vals)
                if math.isnan(mean):
                    continue
                ys.append(j + (k - (len(setups) - 1) / 2) * bar)
                means.append(mean * scale)
                errs.append(sem * scale)
                lo, hi = min(lo, means[-1] - errs[-1]), max(hi, means[-1] + errs[-1])
            ax.barh(ys, means, height=bar, xerr=errs if any(errs) else None, capsize=3, label=" ".join(setup) if len(setups) > 1 else None)
        if math.isfinite(lo):
            lo = min(lo, 0.0) if (use_gap or panel == "efficacy") else lo
            pad = 0.08 * max(hi - lo, 1e-9)
            ax.set_xlim(lo - pad, hi + pad)
        ax.axvline(0, color="k", linewidth=0.6)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        name = panel.removeprefix("ppl_")
        ax.set_title(f"{name}: % of the gap closed" if use_gap else
                     ("mean efficacy" if panel == "efficacy" else f"{panel} (pruned)"), fontsize=9)
        if len(setups) > 1 and n == 0:
            ax.legend(fontsize=7)
    for n in range(len(panels), nrows * ncols):
        axes[n // ncols][n % ncols].axis("off")
    fig.suptitle("mean over seeds, bars: standard error (no bar: one seed)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (or any folder with results.json files)")
    parser.add_argument("--png", type=Path, default=None, help="plot path (default: <sweep_dir>/compare.png)")
    parser.add_argument("--wandb", nargs="?", const="", default=None, metavar="GROUP",
                        help="also log the table and the plot to a W&B run in GROUP (default: the runs' "
                             "experiment_name; offline without WANDB_API_KEY)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    rows, metric, others = build_rows(load_runs(args.sweep_dir))
    print_table(rows, metric, others)
    png = args.png or args.sweep_dir / "compare.png"
    plot(rows, metric, png, others)
    with open(args.sweep_dir / "compare.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nplot: {png}\ntable: {args.sweep_dir / 'compare.csv'}")
    if args.wandb is not None:
        from permsparse.tables import log_to_wandb

        group = args.wandb or _experiment_name(args.sweep_dir)
        folder = log_to_wandb([args.sweep_dir / "compare.csv", png], name=f"compare:{args.sweep_dir.name}",
                              group=group, save_dir=args.sweep_dir, config={"sweep_dir": str(args.sweep_dir),
                                                                           "metric": metric})
        print(f"W&B: {folder} (group {group})")
    return 0


def _experiment_name(root: Path) -> str | None:
    """The ``experiment_name`` of the first run below ``root`` (the group its W&B runs logged to)."""
    runs = load_runs(root)
    return (runs[0].get("config") or {}).get("experiment_name") if runs else None


if __name__ == "__main__":
    sys.exit(main())
