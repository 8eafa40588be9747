"""How many binding groups of a run export can fold into producer weights, and how many need a runtime gather.

    python scripts/fold_report.py <run dir> [<run dir> ...]

For every run folder (``results.json`` + ``perms.pt``) the model architecture is rebuilt from the run's config and
:func:`permsparse.export.plan_fold` decides per group: ``folded`` (into the producer's output rows: ``down``/``fc2``
into ``gate,up``/``fc1``, ``o``/``proj`` into ``v``'s rows when within heads and GQA-tied), ``gathered`` (a runtime
``index_select``) or ``identity`` (nothing to do). Prints one block per run and a summary table. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODES = ("folded", "gathered", "identity")


def report(run_dir: Path, cache: dict) -> dict:
    """The fold plan of one run; the architecture (weights are irrelevant to the plan) is built once per distinct
    loader node and shared through ``cache``."""
    from permsparse.export import plan_fold
    from permsparse.runs import load_run

    run = load_run(run_dir, weights="architecture")
    perms = run.perms  # a missing perms.pt fails before any model is built
    key = json.dumps(run.build_node, sort_keys=True)
    if key not in cache:
        cache[key] = run.model
    model = cache[key]
    results, cfg = run.record.to_dict(), run.config
    plan = plan_fold(model, perms)
    kinds: dict[str, Counter] = {}
    for fold in plan:
        kinds.setdefault(fold.kind, Counter())[fold.mode] += 1
    groups = Counter(f.mode for f in plan)
    linears = Counter()
    for fold in plan:
        linears[fold.mode] += len(fold.linears)
    head_kinds = {"o", "proj"}
    head = Counter(f.mode for f in plan if f.kind in head_kinds)
    gather_reasons = Counter(f.reason.split(" (")[0] for f in plan if f.mode == "gathered" and f.kind in head_kinds)
    metrics = results["metrics"].get("pruned", {})
    return {"run": str(run_dir), "model": results["model"], "perm": results["perm"],
            "foldable": bool(cfg["perm"].get("foldable", False)), "metrics": metrics, "groups": groups,
            "linears": linears, "kinds": kinds, "head": head, "head_reasons": gather_reasons, "n": len(plan)}


def _share(counter: Counter, mode: str) -> str:
    total = sum(counter.values())
    return f"{counter[mode]} ({100 * counter[mode] / total:.1f} %)" if total else "0"


def print_block(r: dict) -> None:
    metric = ", ".join(f"{k} {v:#.4g}" for k, v in r["metrics"].items())
    print(f"{r['run']}\n  model={r['model']} perm={r['perm']} foldable={r['foldable']}  pruned: {metric}")
    print(f"  bound groups {r['n']}: " + ", ".join(f"{m} {_share(r['groups'], m)}" for m in MODES))
    print(f"  bound linears {sum(r['linears'].values())}: " + ", ".join(f"{m} {_share(r['linears'], m)}" for m in MODES))
    for kind, counter in r["kinds"].items():
        print(f"    {kind:<8}" + ", ".join(f"{m} {counter[m]}" for m in MODES if counter[m]))
    for reason, count in r["head_reasons"].items():
        print(f"    o/proj gathered x{count}: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with results.json and perms.pt")
    args = parser.parse_args(argv)
    cache: dict = {}
    rows = []
    for run in args.runs:
        try:
            rows.append(report(run, cache))
        except (FileNotFoundError, KeyError, ValueError) as e:
            print(f"{run}: skipped: {e}", file=sys.stderr)
            continue
        print_block(rows[-1])
        print()
    if not rows:
        return 1
    print(f"{'run':<58}{'perm':<9}{'foldable':<10}{'folded':>8}{'gathered':>10}{'identity':>10}"
          f"{'folded %':>10}{'o/proj folded':>15}")
    for r in rows:
        g, h = r["groups"], r["head"]
        name = r["run"] if len(r["run"]) <= 56 else "..." + r["run"][-53:]
        print(f"{name:<58}{r['perm']:<9}{str(r['foldable']):<10}{g['folded']:>8}{g['gathered']:>10}{g['identity']:>10}"
              f"{100 * g['folded'] / r['n']:>9.1f}%{h['folded']:>9}/{sum(h.values()):<5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
