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


def load_runs(root: Path) -> list[dict]:
    """Every run record below ``root`` (:class:`permsparse.runs.RunRecord`, as a dict with its folder)."""
    from permsparse.runs import RunRecord, find_runs

    return [{**RunRecord.read(run_dir).to_dict(), "_path": str(run_dir)} for run_dir in find_runs(root)]


def main_metric(metrics: dict) -> str:
    """The headline metric: the first perplexity if any (lower is better), else top-1."""
    keys = list(metrics)
    for key in keys:
        if key.startswith("ppl"):
            return key
    return keys[0]


def gap_closed(dense: float, identity: float, method: float, log_scale: bool) -> float:
    """Share of the identity-to-dense gap closed by the method (log-perplexity for perplexities)."""
    f = math.log if log_scale else (lambda x: x)
    denom = f(identity) - f(dense)
    return float("nan") if denom == 0 else (f(identity) - f(method)) / denom


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
        identity_of = m.get("identity", m["pruned"] if run["perm"] == "none" else {})
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


def plot(rows: list[dict], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["pattern"], r["pruner"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len({r["perm"] for r in rows}), 1)
    perms = list(dict.fromkeys(r["perm"] for r in rows))
    for i, perm in enumerate(perms):
        for ax, field in zip(axes, (metric, "efficacy"), strict=False):
            xs, ys = [], []
            for k, key in enumerate(keys):
                vals = [r[field] for r in rows if (r["model"], r["pattern"], r["pruner"]) == key and r["perm"] == perm]
                if vals:
                    xs.append(k + i * width)
                    ys.append(sum(vals) / len(vals))
            ax.bar(xs, ys, width=width, label=perm)
    dense = {key: next(r[f"dense_{metric}"] for r in rows if (r["model"], r["pattern"], r["pruner"]) == key)
             for key in keys}
    for k, key in enumerate(keys):
        axes[0].hlines(dense[key], k - 0.1, k + 0.8, colors="k", linestyles="--", label="dense" if k == 0 else None)
    for ax, title in zip(axes, (f"{metric} (pruned; dashed: dense)", "mean efficacy (Apex metric)"), strict=False):
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
        ax.set_xticklabels(["\n".join(key) for key in keys], fontsize=8)
        ax.set_title(title)
    if metric.startswith("ppl"):
        axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (or any folder with results.json files)")
    parser.add_argument("--png", type=Path, default=None, help="plot path (default: <sweep_dir>/compare.png)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    rows, metric, others = build_rows(load_runs(args.sweep_dir))
    print_table(rows, metric, others)
    png = args.png or args.sweep_dir / "compare.png"
    plot(rows, metric, png)
    with open(args.sweep_dir / "compare.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nplot: {png}\ntable: {args.sweep_dir / 'compare.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
