"""Export the datasets of lm-eval tasks to a folder that ``eval.lm_eval.data_dir`` reads offline.

Run it once on a machine that reaches the Hugging Face hub (or has the datasets in its cache), then copy the
folder to the machine that runs the experiments::

    python scripts/lm_eval_data.py /data/lm_eval                         # the paper's seven tasks (MMLU: 57 subjects)
    python scripts/lm_eval_data.py /data/lm_eval --tasks arc_easy piqa   # any lm-eval tasks
    python scripts/lm_eval_data.py /data/lm_eval --tasks mmmu_val        # Table 3 (Parquet: the images)
    python train.py eval/lm_eval=paper eval.lm_eval.data_dir=/data/lm_eval

Each dataset lands in ``<folder>/<hub path>/<config>/<split>.jsonl`` (``.parquet`` when it holds images; docs/protocols.md,
zero-shot evaluation).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from permsparse.errors import ConfigError
    from permsparse.zeroshot import PAPER_TASKS, export_task_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="the folder to write (eval.lm_eval.data_dir)")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), help="lm-eval task, group or tag names "
                        "(default: the paper's seven)")
    parser.add_argument("--include", default=None, help="a folder of extra task YAMLs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = export_task_data(args.tasks, args.data_dir, include=args.include)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(written)} dataset(s) written under {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
