"""Settings over seeds, and how far each one leads the best heuristic: ``python scripts/seeds.py DIR [DIR ...]``.

Reads every ``results.json`` below the folders and groups the runs by setting: the permutation method and the run's
overrides without ``seed=`` (as ``scripts/compare.py`` names them). For every setting and every pruned metric
(``top1``, ``ppl_<domain>``) it prints the mean, the standard deviation over seeds, the relative spread (sd / mean)
and the standard error, beside the learned runs' mean best validation loss (the only number a setting may be chosen
by). Then, for each setting, its lead over the reference on the headline metric (by default the best heuristic:
the best mean among ``none``, ``ria`` and ``greedy``), measured two ways:

* unpaired: the difference of the means over the standard error of that difference
  (``sqrt(se_a^2 + se_b^2)``);
* paired by seed: the mean of the per-seed differences over their standard error (only the seeds both ran).

A lead is positive when the setting is better (higher top-1, lower perplexity). ``--metric`` picks the headline
metric, ``--reference`` a setting label to compare against, ``--seeds 0,1,2`` keeps those seeds only, and ``--csv``
writes the table. ``--val-reference SETTING`` adds every learned setting's best validation loss paired by seed
against that setting's: the validation windows follow the seed, so a loss differs more between seeds than between
settings, and only the per-seed difference compares two settings. Nothing is chosen here: to choose a learned
setting, read the validation losses (or the leave-one-source-out folds, ``scripts/select_setting.py``), never a
held-out domain.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import load_folders, variant  # noqa: E402

from permsparse.tables import main_metric  # noqa: E402

HEURISTICS = ("none", "ria", "greedy")


def setting_of(run: dict) -> str:
    """The run's permutation method and its overrides without the seed (and without ``perm=``, named first)."""
    words = [w for w in variant(run).split() if not w.startswith(("seed=", "perm="))]
    return " ".join([run["perm"], *words])


def collect(runs: list[dict], seeds: set[int] | None = None) -> dict[str, dict[int, dict]]:
    """``{setting: {seed: run}}``. Overrides shared by every run are left out of the names. Where two runs have the
    same setting and seed (two sweeps of one command, e.g. made before and after a default changed), that setting is
    split by the folder above each run, which is added to its name in brackets."""
    runs = [r for r in runs if seeds is None or int(r.get("seed", 0)) in seeds]
    names = [setting_of(r).split() for r in runs]
    common = set.intersection(*(set(n[1:]) for n in names)) if names else set()
    named = [" ".join(w for w in n if w not in common) for n in names]
    per_seed = Counter((n, int(r.get("seed", 0))) for r, n in zip(runs, named, strict=True))
    clash = {name for (name, _), count in per_seed.items() if count > 1}
    out: dict[str, dict[int, dict]] = {}
    for run, name in zip(runs, named, strict=True):
        if name in clash:
            name = f"{name} [{Path(run['_path']).parent.name}]"
        out.setdefault(name, {})[int(run.get("seed", 0))] = run
    return out


def higher_is_better(metric: str) -> bool:
    return not metric.startswith("ppl")


def summary(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = statistics.stdev(values) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "rel_sd": sd / abs(mean) if n > 1 and mean else math.nan,
            "se": sd / math.sqrt(n) if n > 1 else math.nan}


def lead(a: dict[int, float], b: dict[int, float], higher: bool) -> dict[str, float]:
    """How far ``a`` leads ``b`` (per-seed values): the difference of means and, unpaired and paired by seed, that
    difference in standard errors (positive: ``a`` is better)."""
    sign = 1.0 if higher else -1.0
    sa, sb = summary(list(a.values())), summary(list(b.values()))
    diff = sign * (sa["mean"] - sb["mean"])
    unpaired_se = math.sqrt(sa["se"] ** 2 + sb["se"] ** 2) if sa["n"] > 1 and sb["n"] > 1 else math.nan
    common = sorted(set(a) & set(b))
    diffs = [sign * (a[s] - b[s]) for s in common]
    paired = summary(diffs)
    return {"diff": diff, "unpaired_z": diff / unpaired_se if unpaired_se else math.nan,
            "paired_diff": paired["mean"], "paired_z": paired["mean"] / paired["se"] if paired["se"] else math.nan,
            "paired_seeds": len(common)}


def _best_val_loss(run: dict) -> float | None:
    value = (run.get("learning") or {}).get("best_val_loss")
    return None if value is None else float(value)


def val_leads(groups: dict[str, dict[int, dict]], reference: str) -> list[dict]:
    """Every learned setting's best validation loss against ``reference``'s, paired by seed: ``{setting, seeds,
    per_seed: {seed: reference - setting}, mean, z}`` (positive: the setting's loss is lower), best first."""
    if reference not in groups:
        raise SystemExit(f"--val-reference {reference!r} is not a setting here: {sorted(groups)}")
    ref = {seed: v for seed, run in groups[reference].items() if (v := _best_val_loss(run)) is not None}
    if not ref:
        raise SystemExit(f"--val-reference {reference!r} has no learned run (no best validation loss)")
    out = []
    for setting, runs in groups.items():
        mine = {seed: v for seed, run in runs.items() if (v := _best_val_loss(run)) is not None}
        common = sorted(set(mine) & set(ref))
        if setting == reference or not common:
            continue
        paired = lead(mine, ref, higher=False)  # lower is better: positive when ``setting``'s loss is lower
        out.append({"setting": setting, "seeds": common, "per_seed": {seed: ref[seed] - mine[seed] for seed in common},
                    "mean": paired["paired_diff"], "z": paired["paired_z"]})
    return sorted(out, key=lambda r: -r["mean"])


def print_val_leads(leads: list[dict], reference: str) -> None:
    print(f"\nbest validation loss, paired by seed, against {reference!r} (positive: lower than it; the number a "
          "setting is chosen by)")
    width = max((len(r["setting"]) for r in leads), default=7)
    for r in leads:
        per_seed = " / ".join(f"{r['per_seed'][s]:+.4f}" for s in r["seeds"])
        print(f"{r['setting']:<{width}}  {r['mean']:+8.4f}  z {r['z']:+6.2f}   per seed {per_seed} "
              f"(seeds {','.join(map(str, r['seeds']))})")


def table(groups: dict[str, dict[int, dict]], metric: str | None = None,
          reference: str | None = None) -> tuple[list[dict], str, str | None]:
    """One row per setting: ``{setting, seeds, val_loss, <metric>: summary, ..., lead}``; the headline metric; the
    reference setting (``None`` when there is none to compare against)."""
    if not groups:
        raise SystemExit("no results.json found below those folders")
    first = next(iter(next(iter(groups.values())).values()))
    metric = metric or main_metric(first["metrics"]["pruned"])
    every = [r["metrics"]["pruned"] for runs in groups.values() for r in runs.values()]
    metrics = [metric, *(k for k in first["metrics"]["pruned"] if k != metric and not k.endswith("_stderr")
                         and all(k in m for m in every))]
    higher = higher_is_better(metric)
    values = {s: {seed: float(r["metrics"]["pruned"][metric]) for seed, r in runs.items()
                  if metric in r["metrics"]["pruned"]} for s, runs in groups.items()}
    if reference is None:
        heur = {s: summary(list(v.values()))["mean"] for s, v in values.items()
                if v and next(iter(groups[s].values()))["perm"] in HEURISTICS and
                next(iter(groups[s].values()))["perm"] != "none"}
        if heur:
            reference = (max if higher else min)(heur, key=heur.get)
    elif reference not in groups:
        raise SystemExit(f"--reference {reference!r} is not a setting here: {sorted(groups)}")
    rows = []
    for setting, runs in groups.items():
        row: dict = {"setting": setting, "seeds": ",".join(str(s) for s in sorted(runs))}
        vals = [v for r in runs.values() if (v := _best_val_loss(r)) is not None]
        row["val_loss"] = sum(vals) / len(vals) if vals else math.nan
        for m in metrics:
            row[m] = summary([float(r["metrics"]["pruned"][m]) for r in runs.values() if m in r["metrics"]["pruned"]])
        row["lead"] = (lead(values[setting], values[reference], higher)
                       if reference is not None and setting != reference else None)
        rows.append(row)
    rows.sort(key=lambda r: (-1 if higher else 1) * r[metric]["mean"])
    return rows, metric, reference


def print_table(rows: list[dict], metric: str, reference: str | None) -> None:
    metrics = [k for k in rows[0] if isinstance(rows[0][k], dict) and k != "lead"]
    width = max(len(r["setting"]) for r in rows)
    print(f"{'setting':<{width}}  seeds      val loss  " + "  ".join(f"{m:>28}" for m in metrics))
    print(f"{'':<{width}}                       " + "  ".join(f"{'mean ± sd (sd/mean)':>28}" for _ in metrics))
    for r in rows:
        cells = [f"{r[m]['mean']:9.3f} ± {r[m]['sd']:6.3f} ({100 * r[m]['rel_sd']:4.1f} %)" for m in metrics]
        val = f"{r['val_loss']:8.4f}" if not math.isnan(r["val_loss"]) else f"{'':8}"
        print(f"{r['setting']:<{width}}  {r['seeds']:<9}  {val}  " + "  ".join(f"{c:>28}" for c in cells))
    if reference is None:
        return
    better = "higher" if higher_is_better(metric) else "lower"
    print(f"\nlead on {metric} over {reference!r} ({better} is better; z: the lead in standard errors)")
    for r in rows:
        if r["lead"] is None:
            continue
        d = r["lead"]
        print(f"{r['setting']:<{width}}  {d['diff']:+8.3f}  unpaired z {d['unpaired_z']:+6.2f}   "
              f"paired {d['paired_diff']:+8.3f}, z {d['paired_z']:+6.2f} over {d['paired_seeds']} seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders with run folders (results.json) below them")
    parser.add_argument("--metric", default=None, help="headline metric (default: the runs' main one)")
    parser.add_argument("--reference", default=None, help="setting to compare against (default: the best heuristic)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to keep (default: all)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    parser.add_argument("--val-reference", default=None,
                        help="a learned setting: compare every learned setting's best validation loss with its, by seed")
    args = parser.parse_args(argv)
    runs = load_folders(args.folders)
    if runs is None:
        return 2
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    groups = collect(runs, seeds)
    rows, metric, reference = table(groups, args.metric, args.reference)
    print_table(rows, metric, reference)
    if args.val_reference is not None:
        print_val_leads(val_leads(groups, args.val_reference), args.val_reference)
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            metrics = [k for k in rows[0] if isinstance(rows[0][k], dict) and k != "lead"]
            writer.writerow(["setting", "seeds", "val_loss", *(f"{m}_{s}" for m in metrics for s in ("mean", "sd", "se")),
                             "lead", "unpaired_z", "paired_lead", "paired_z"])
            for r in rows:
                d = r["lead"] or {}
                writer.writerow([r["setting"], r["seeds"], r["val_loss"],
                                 *(r[m][s] for m in metrics for s in ("mean", "sd", "se")),
                                 d.get("diff", ""), d.get("unpaired_z", ""), d.get("paired_diff", ""),
                                 d.get("paired_z", "")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
