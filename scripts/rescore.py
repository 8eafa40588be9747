"""Re-measure saved runs on more evaluation windows: ``python scripts/rescore.py DIR [DIR ...] --set KEY=VALUE``.

A run scores each domain on its first few non-overlapping windows (the mixture protocol: 16 per held-out domain).
Whether two runs really differ on a domain, or only on those few windows, is a question about the evaluation, not
the method. This script rebuilds every run's pruned model from its folder (``pruned.safetensors``, through
``permsparse.runs.load_run``), rebuilds its data module with ``--set`` overrides (e.g. ``held_out_windows=200``),
and scores every window of the chosen domains one by one. Nothing is learned or chosen here: it reads held-out text
only to measure runs that are already finished.

For every setting (runs grouped by seed as ``scripts/seeds.py`` does) and domain it prints:

* the perplexity on the run's own windows (the first ``k``, recomputed; a line warns where it differs from the
  run's ``results.json`` by more than 0.1 %, which would mean the rebuilt model is not the run's),
* the perplexity on every window scored, and on the windows beyond the first ``k``,
* mean ± sd over seeds of each, and the spread (sd / mean) that the same seeds show on disjoint blocks of ``k``
  windows: if the spread on all windows is much smaller than on ``k``-window blocks, the small evaluation set, not
  the method, made the runs look far apart.

``--out FILE.json`` keeps the per-window NLLs, keyed by run folder and domain; a run already in the file is not
scored again (a long rescoring resumes where it stopped). A file written with other ``--set`` values is started
afresh, since its windows are not the same.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import load_folders  # noqa: E402
from seeds import collect, summary  # noqa: E402

TOLERANCE = 1e-3  # relative: the recomputed protocol perplexity against results.json


def parse_sets(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: write KEY=VALUE, e.g. held_out_windows=200")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def score_run(run_dir: Path, sets: dict[str, object], domains: list[str] | None, batch_size: int,
              progress: bool) -> dict[str, dict]:
    """``{metric: {"k": protocol window count, "nll": [per-window mean NLL]}}`` for one run folder."""
    from hydra.utils import instantiate

    from permsparse.data.text import window_nlls
    from permsparse.runs import load_run

    run = load_run(run_dir)
    protocol = {name: len(w) for name, w in run.datamodule.eval_sets().items()}
    node = dict(run.config["dataset"]["datamodule"], **sets)
    kwargs = {"tokenizer": run.tokenizer} if run.tokenizer is not None else {}
    windows = instantiate(node, seed=run.record.seed, **kwargs).eval_sets()
    names = [n for n in windows if domains is None or n in domains]
    missing = sorted(set(domains or ()) - set(windows))
    if missing:
        raise SystemExit(f"{run_dir}: no evaluation set {missing}; it has {sorted(windows)}")
    out = {}
    for name in names:
        nll = window_nlls(run.model, windows[name], batch_size=batch_size, progress=progress)
        out[name] = {"k": protocol.get(name, 0), "nll": [float(x) for x in nll]}
    return out


def ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll)) if nll else math.nan


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    s = summary(values)
    return f"{s['mean']:.2f} ± {s['sd']:.2f} ({s['rel_sd']:.1%})"


def block_spreads(per_seed: list[list[float]], k: int) -> list[float]:
    """sd / mean over seeds of the perplexity on each disjoint block of ``k`` windows (all seeds scored alike)."""
    n = min(len(v) for v in per_seed)
    return [summary([ppl(v[start:start + k]) for v in per_seed])["rel_sd"] for start in range(0, n - k + 1, k)]


def report(runs: list[dict], scores: dict[str, dict]) -> list[dict]:
    rows = []
    for setting, by_seed in sorted(collect(runs).items()):
        seeds = sorted(by_seed)
        scored = [scores.get(str(by_seed[s]["_path"]), {}) for s in seeds]
        metrics = [m for m in scored[0] if all(m in e for e in scored)]  # the domains every seed was scored on
        for metric in metrics:
            entries = [e[metric] for e in scored]
            k = entries[0]["k"]
            own = [ppl(e["nll"][:k]) for e in entries]
            rest = [ppl(e["nll"][k:]) for e in entries]
            every = [ppl(e["nll"]) for e in entries]
            for s, value in zip(seeds, own, strict=True):
                recorded = by_seed[s]["metrics"]["pruned"].get(metric)
                if k and recorded is not None and abs(value / float(recorded) - 1) > TOLERANCE:
                    print(f"warning: {setting} seed {s} {metric}: {value:.3f} on its own {k} windows, "
                          f"{float(recorded):.3f} in results.json: the rebuilt model is not the run's", file=sys.stderr)
            blocks = block_spreads([e["nll"] for e in entries], k) if k and len(seeds) > 1 else []
            rows.append({"setting": setting, "metric": metric, "seeds": seeds, "k": k,
                         "n": min(len(e["nll"]) for e in entries), "own": own, "rest": rest, "all": every,
                         "block_spreads": blocks})
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        seeds = ",".join(map(str, r["seeds"]))
        print(f"\n{r['setting']}  {r['metric']}  seeds {seeds}")
        print(f"  own {r['k']} windows   {' / '.join(f'{v:.2f}' for v in r['own'])}   {spread(r['own'])}")
        if r["n"] > r["k"]:
            print(f"  next {r['n'] - r['k']} windows  {' / '.join(f'{v:.2f}' for v in r['rest'])}   {spread(r['rest'])}")
        print(f"  all {r['n']} windows   {' / '.join(f'{v:.2f}' for v in r['all'])}   {spread(r['all'])}")
        if r["block_spreads"]:
            b = sorted(r["block_spreads"])
            print(f"  spread over seeds on {len(b)} disjoint blocks of {r['k']} windows: median {statistics.median(b):.1%} "
                  f"[{b[0]:.1%} .. {b[-1]:.1%}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, or folders above them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="data module override for the rescoring, e.g. held_out_windows=200 (repeatable)")
    parser.add_argument("--domains", default=None, help="comma-separated metrics to score, e.g. ppl_pydoc,ppl_manpages")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="JSON of per-window NLLs; runs already in it are kept")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    runs = load_folders(args.folders)
    if runs is None:
        return 2
    if not runs:
        print("error: no results.json below those folders", file=sys.stderr)
        return 2
    sets = parse_sets(args.set)
    domains = args.domains.split(",") if args.domains else None
    scores: dict[str, dict] = {}
    if args.out is not None and args.out.is_file():
        saved = json.loads(args.out.read_text())
        if saved.get("set") == sets:
            scores = saved["runs"]
    for i, run in enumerate(runs, 1):
        key = str(run["_path"])
        if key in scores and (domains is None or all(d in scores[key] for d in domains)):
            continue
        print(f"[{i}/{len(runs)}] scoring {key}", file=sys.stderr, flush=True)
        scores[key] = score_run(Path(key), sets, domains, args.batch_size, args.progress)
        if args.out is not None:
            args.out.write_text(json.dumps({"set": sets, "runs": scores}))
    print_rows(report(runs, scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
