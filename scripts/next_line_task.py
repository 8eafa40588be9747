"""An offline multiple-choice lm-eval task from a local corpus: ``python scripts/next_line_task.py <data_dir>``.

Each question shows one line of the corpus (default ``pydoc``, the text the Shakespeare protocol never learns
on) and offers four candidate next lines: the true one and three other lines of the same corpus, in a seeded
order. A model that has learned the language of the text puts the most likelihood on the true line; chance is
25 %. The folder is laid out as ``eval.lm_eval.data_dir`` reads it (docs/protocols.md, zero-shot evaluation)::

    python scripts/next_line_task.py /tmp/next_line
    python train.py eval.lm_eval.tasks=[permsparse_next_line] eval.lm_eval.data_dir=/tmp/next_line

No network: the text comes from the offline corpora (permsparse.data.text). The same corpus, count and seed
always give the same questions.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TASK = "permsparse_next_line"
HUB_ID = "permsparse/next_line"  # a made-up hub id: only <data_dir>/permsparse/next_line/ holds the data
MIN_CHARS = 40  # lines shorter than this (headings, code fragments) are neither questions nor choices
TASK_YAML = f"""\
task: {TASK}
dataset_path: {HUB_ID}
output_type: multiple_choice
test_split: test
training_split: train
doc_to_text: "{{{{context}}}}\\n"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def questions(corpus: str = "pydoc", n: int = 200, seed: int = 0, choices: int = 4) -> list[dict]:
    """``n`` questions ``{"context", "choices", "answer"}``: a line, its true next line among ``choices - 1``
    other lines of the corpus. Consecutive pairs of long lines only; distractors never equal the true line."""
    from permsparse.data.text import load_corpus

    lines = [line.strip() for line in load_corpus(corpus).splitlines()]
    pairs = [(a, b) for a, b in zip(lines, lines[1:], strict=False) if len(a) >= MIN_CHARS and len(b) >= MIN_CHARS]
    pool = sorted({b for _, b in pairs})
    if len(pairs) < n:
        raise ValueError(f"corpus {corpus!r} has {len(pairs)} pairs of consecutive long lines; asked for {n}")
    rng = random.Random(seed)
    out = []
    for context, true in rng.sample(pairs, n):
        others = rng.sample([line for line in pool if line != true], choices - 1)
        options = [true, *others]
        rng.shuffle(options)
        out.append({"context": context, "choices": options, "answer": options.index(true)})
    return out


def write_task(data_dir: str | Path, corpus: str = "pydoc", n: int = 200, seed: int = 0) -> Path:
    """The task YAML (``<data_dir>/tasks/``) and its test split plus two few-shot rows (``train``)."""
    root = Path(data_dir)
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML, encoding="utf-8")
    rows = questions(corpus, n + 2, seed)
    data = root / HUB_ID
    data.mkdir(parents=True, exist_ok=True)
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]), encoding="utf-8")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n:]), encoding="utf-8")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="the folder to write (eval.lm_eval.data_dir)")
    parser.add_argument("--corpus", default="pydoc", help="an offline corpus (default: pydoc)")
    parser.add_argument("--n", type=int, default=200, help="questions (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_task(args.data_dir, args.corpus, args.n, args.seed)
    print(f"{TASK}: {args.n} questions from {args.corpus} in {root}\n"
          f"python train.py eval.lm_eval.tasks=[{TASK}] eval.lm_eval.data_dir={root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
