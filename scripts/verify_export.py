"""Does an exported run reproduce the run's own pruned metric? Reload the export, re-evaluate it, compare.

    python scripts/verify_export.py <run dir> [<run dir> ...] [--export DIR]

For every run folder exported by ``python -m permsparse.export <run dir>`` (default export folder
``<run dir>/export``): :func:`permsparse.export.load_exported` rebuilds the deployed model (and re-verifies it on
the stored reference batch); every ``nn.Linear`` is checked N:M *as stored*; the run's datamodule is rebuilt from
``results.json`` (same dataset, seed and windows) and evaluated with the same ``evaluate`` call and batch size as
``permsparse.run.train``. Prints the results.json ``pruned`` metric next to the exported model's and whether they
agree to 4 significant digits. Exit status 1 if any run disagrees or a pruned linear is not N:M.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _sig4(x: float) -> str:
    return f"{x:#.4g}"


def verify(run_dir: Path, export_dir: Path | None) -> bool:
    import torch
    from torch import nn

    from permsparse.export import load_exported
    from permsparse.runs import load_run
    from permsparse.sparsity.nm import is_nm
    from permsparse.utils.io import read_json

    run = load_run(run_dir, weights="architecture")  # the run's data (and tokenizer); the model is the export's
    results, cfg = run.record.to_dict(), run.config
    export_dir = export_dir or run_dir / "export"
    sidecar = read_json(export_dir / "permsparse_export.json")
    pattern = sidecar["pattern"]
    model = load_exported(export_dir)  # raises if the reloaded model does not match the stored reference outputs

    bound = {n for g in sidecar["groups"].values() for n in g["linears"]}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    not_nm = sorted(n for n, m in linears.items() if not is_nm(m.weight.detach(), pattern))
    bad_bound = sorted(set(not_nm) & bound)
    # at most N non-zeros per M is the N:M property; fewer in a group means the dense weight held exact zeros there
    exact = sum(is_nm(linears[n].weight.detach(), pattern, exact=True) for n in bound)
    counts = sidecar["counts"]
    print(f"{run_dir}  (export {export_dir})")
    print(f"  model={results['model']} perm={results['perm']} foldable={cfg['perm'].get('foldable', False)}; "
          f"groups folded {counts['folded']}, gathered {counts['gathered']}, identity {counts['identity']}; "
          f"reference max abs diff {sidecar['verification']['max_abs_diff']:.2e} "
          f"(reload {sidecar['verification']['reload_max_abs_diff']:.2e}, {sidecar['verification']['dtype']})")
    print(f"  nn.Linear {len(linears)}: {len(linears) - len(not_nm)} {pattern} as stored; pruned (bound) "
          f"{len(bound)}, of which not {pattern}: {len(bad_bound)}, exactly N non-zeros in every group: {exact}; "
          "not pruned by design: "
          f"{', '.join(n for n in not_nm if n not in bound) or 'none'}")

    datamodule = run.datamodule
    start = time.perf_counter()
    with torch.no_grad():
        metrics = datamodule.evaluate(model, batch_size=cfg["eval"]["batch_size"], progress=False)
    seconds = time.perf_counter() - start
    ok = not bad_bound
    for key, recorded in results["metrics"]["pruned"].items():
        got = float(metrics[key])
        agree = _sig4(got) == _sig4(recorded)
        ok &= agree
        print(f"  {key}: results.json {recorded:.6f}  exported {got:.6f}  rel diff {abs(got - recorded) / abs(recorded):.1e}"
              f"  -> 4 significant digits {_sig4(recorded)} vs {_sig4(got)}: {'agree' if agree else 'DISAGREE'}")
    print(f"  evaluation {seconds:.0f} s; {'OK' if ok else 'FAILED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="exported run folders")
    parser.add_argument("--export", type=Path, default=None, help="export folder (one run only; default <run>/export)")
    args = parser.parse_args(argv)
    if args.export is not None and len(args.runs) != 1:
        parser.error("--export needs exactly one run folder")
    ok = True
    for run in args.runs:
        ok &= verify(run, args.export)
        print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
