"""Choose a learned-method setting from leave-one-source-out folds, never from a held-out domain:
``python scripts/select_setting.py multirun/loso [more folders...]``.

Reads every ``results.json`` below the folders whose run validated on one mixture source
(``dataset.datamodule.validation_source``, ``experiment=loso``), groups the runs by setting (their overrides
without the fold), and prints one row per setting: its best validation loss on every fold and their mean
(lower is better), sorted by that mean. A setting missing a fold is listed but not ranked. The seed is not part of
a setting: runs of one setting with other seeds (``seed=1``) are pooled, each fold's loss is their mean, and two more
columns say how many seeds covered every fold and, with two or more, the standard deviation of the per-seed means
over the folds (how far one seed's verdict can be trusted). ``--csv`` writes the table too. Perplexities on held-out domains are deliberately not shown: they play no part in the choice.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import load_folders, variant  # noqa: E402

FOLD_KEY = "dataset.datamodule.validation_source="
_NOT_A_SETTING = ("experiment=", "seed=")


def setting_of(run: dict) -> str:
    """The run's overrides without its fold and the experiment name: what a candidate setting is."""
    words = [w for w in variant(run).split() if not w.startswith(FOLD_KEY) and not w.startswith(_NOT_A_SETTING)]
    return " ".join(words) or "(defaults)"


def fold_of(run: dict) -> str | None:
    return (run.get("protocol") or {}).get("validation_source")


def fold_losses(runs: list[dict]) -> Iterator[tuple[str, str, int, float]]:
    """``(setting, fold, seed, best validation loss)`` of every learned fold run."""
    for run in runs:
        fold, learning = fold_of(run), run.get("learning") or {}
        if fold is not None and "best_val_loss" in learning:
            yield setting_of(run), fold, int(run.get("seed", 0)), float(learning["best_val_loss"])


def collect(runs: list[dict]) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """``{setting: {fold: best validation loss}}`` and the folds seen, in first-seen order. Two runs of one
    setting on one fold (e.g. two seeds) are averaged."""
    table: dict[str, dict[str, list[float]]] = {}
    folds: list[str] = []
    for setting, fold, _, loss in fold_losses(runs):
        if fold not in folds:
            folds.append(fold)
        table.setdefault(setting, {}).setdefault(fold, []).append(loss)
    return {s: {f: sum(v) / len(v) for f, v in by_fold.items()} for s, by_fold in table.items()}, folds


def seed_means(runs: list[dict], folds: list[str]) -> dict[str, dict[int, float]]:
    """``{setting: {seed: mean best validation loss over the folds}}`` for every seed that has a run on each fold."""
    by: dict[str, dict[int, dict[str, list[float]]]] = {}
    for setting, fold, seed, loss in fold_losses(runs):
        by.setdefault(setting, {}).setdefault(seed, {}).setdefault(fold, []).append(loss)
    return {setting: {seed: sum(sum(v[f]) / len(v[f]) for f in folds) / len(folds)
                      for seed, v in seeds.items() if all(f in v for f in folds)}
            for setting, seeds in by.items()}


def rank(table: dict[str, dict[str, float]], folds: list[str],
         seeds: dict[str, dict[int, float]] | None = None) -> list[dict]:
    rows = []
    for setting, by_fold in table.items():
        complete = all(f in by_fold for f in folds)
        mean = sum(by_fold[f] for f in folds) / len(folds) if complete else math.nan
        per_seed = list((seeds or {}).get(setting, {}).values())
        sd = statistics.stdev(per_seed) if len(per_seed) > 1 else math.nan
        rows.append({"setting": setting, **{f: by_fold.get(f, math.nan) for f in folds}, "mean": mean,
                     "seeds": len(per_seed), "seed_sd": sd, "complete": complete})
    rows.sort(key=lambda r: (not r["complete"], r["mean"] if r["complete"] else 0.0, r["setting"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders with fold runs (experiment=loso multiruns)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    runs = load_folders(args.folders)
    if runs is None:
        return 2
    table, folds = collect(runs)
    if not table:
        print("error: no learned run with dataset.datamodule.validation_source set below those folders "
              "(run: python train.py -m experiment=loso ...)", file=sys.stderr)
        return 2
    rows = rank(table, folds, seed_means(runs, folds))
    cols = ["setting", *folds, "mean", "seeds", "seed_sd"]

    def cell(r: dict, c: str) -> str:
        return r[c] if c == "setting" else str(r[c]) if c == "seeds" else f"{r[c]:.4f}"

    widths = {c: max(len(c), *(len(cell(r, c)) for r in rows)) for c in cols}
    print("best validation loss per leave-one-source-out fold (lower is better; seeds pooled)")
    print("  ".join(c.ljust(widths[c]) if c == "setting" else c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(cell(r, c).ljust(widths[c]) if c == "setting" else cell(r, c).rjust(widths[c]) for c in cols))
    best = rows[0]
    if best["complete"]:
        print(f"\nchosen: {best['setting']} (mean {best['mean']:.4f} over {len(folds)} folds)")
    else:
        print("\nno setting has a run on every fold yet", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=[*cols, "complete"])
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
