"""The paper's tables from run folders, ours beside the paper's numbers:
``python scripts/make_tables.py multirun/paper_table1/<date> [more run or sweep folders...]``.

Reads every ``results.json`` below the folders (permsparse.runs.RunRecord) and fills each of the paper's tables
that any run belongs to (src/permsparse/paper.py holds their layouts and the paper's numbers). Writes, into
``--out`` (default: ``<first folder>/tables``), per table ``<table>.md`` and ``<table>.csv`` (one line per cell:
paper, ours, standard error, seeds, run folders) and the plots ``<table>_metrics.png`` (each method's value with
error bars over seeds, on an axis that spans the values), ``<table>_curves.png`` (the learned permutation's
validation loss) and ``<table>_efficacy.png`` (per-layer efficacy of each permutation); ``tables.md`` holds them
all and is printed. ``--model llama3_2_1b=smollm2_135m`` puts another model's runs in a paper model's rows (an
offline miniature in the paper's layout). docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _models(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        paper, sep, ours = pair.partition("=")
        if not sep or not paper or not ours:
            raise SystemExit(f"error: --model {pair!r}: expected PAPER_MODEL=OUR_MODEL, e.g. llama3_2_1b=smollm2_135m")
        out[paper] = ours
    return out


def main(argv: list[str] | None = None) -> int:
    from permsparse.paper import TABLES
    from permsparse.tables import make_tables

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders, sweep folders, or folders holding them")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first folder>/tables)")
    parser.add_argument("--tables", default=None,
                        help=f"comma-separated tables to write even if empty ({', '.join(t.key for t in TABLES)}; "
                             "default: every table some run belongs to)")
    parser.add_argument("--model", action="append", default=[], metavar="PAPER=OURS",
                        help="fill a paper model's rows with another model's runs (repeatable)")
    parser.add_argument("--wandb", nargs="?", const="", default=None, metavar="GROUP",
                        help="also log every table and plot to one W&B run per table, in GROUP (default: the "
                             "table's experiment, e.g. paper_table1; offline without WANDB_API_KEY)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.tables.split(",") if k.strip()] if args.tables else None
    out = args.out or args.dirs[0] / "tables"
    try:
        written = make_tables(args.dirs, out, keys, _models(args.model))
    except (FileNotFoundError, KeyError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    if not written:
        print("no run belongs to any paper table (see --model to place another model's runs)", file=sys.stderr)
        return 1
    print((out / "tables.md").read_text(encoding="utf-8"))
    for key, files in written.items():
        print(f"{key}: " + ", ".join(str(f) for f in files))
    if args.wandb is not None:
        from permsparse.tables import log_to_wandb

        experiments = {t.key: t.experiment for t in TABLES}
        for key, files in written.items():
            group = args.wandb or experiments.get(key)
            folder = log_to_wandb(files, name=f"tables:{key}", group=group, save_dir=out, config={"table": key})
            print(f"W&B {key}: {folder} (group {group})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
