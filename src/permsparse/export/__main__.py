"""``python -m permsparse.export <run dir> [--out DIR] [--require-foldable] [--no-fold-residual]``: export a finished run folder."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Export the run folder given on the command line; print the per-group fold report; 0 on success."""
    parser = argparse.ArgumentParser(
        prog="python -m permsparse.export",
        description="Fold a run's permutations into its pruned weights, save the deployed model and verify it.",
    )
    parser.add_argument("run_dir", help="a run folder with results.json, perms.pt and pruned.safetensors")
    parser.add_argument("--out", default=None, help="export folder (default: <run_dir>/export)")
    parser.add_argument("--require-foldable", action="store_true",
                        help="refuse o/proj (and down/fc2) permutations that need a runtime gather")
    parser.add_argument("--no-fold-residual", dest="fold_residual", action="store_false",
                        help="gather the residual-reading groups even when they share one permutation "
                             "(perm.residual=shared runs fold it into the residual stream by default)")
    parser.add_argument("--tol", type=float, default=1e-5,
                        help="allowed max abs output difference, times max(1, largest |output|) (default 1e-5)")
    parser.add_argument("--verify-dtype", default="float64",
                        help="dtype of the verification forward passes (float64, or 'model' for the model's own)")
    args = parser.parse_args(argv)

    import torch

    from permsparse.export.export import ExportVerificationError, read_json
    from permsparse.runs import export_run

    vdtype = None if args.verify_dtype == "model" else getattr(torch, args.verify_dtype)
    try:
        path = export_run(args.run_dir, args.out, require_foldable=args.require_foldable, tol=args.tol,
                          verify_dtype=vdtype, fold_residual=args.fold_residual)
    except (ExportVerificationError, FileNotFoundError, ValueError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    from permsparse.export.export import SIDECAR

    sidecar = read_json(path / SIDECAR)
    width = max(len(n) for n in sidecar["groups"]) + 2
    for name, g in sidecar["groups"].items():
        print(f"{name:<{width}}{g['mode']:<11}{g['reason']}")
    c = sidecar["counts"]
    v = sidecar["verification"]
    if sidecar.get("residual_stream", {}).get("folded"):
        print("residual stream: one shared permutation folded into embeddings, norms, writers and head")
    print(f"{c['folded']} groups folded, {c['gathered']} gathered, {c['identity']} identity; "
          f"max abs diff {v['max_abs_diff']:.2e} (reload {v['reload_max_abs_diff']:.2e}, tol {v['tol']:.0e}, "
          f"{v['dtype']})")
    print(f"exported to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
