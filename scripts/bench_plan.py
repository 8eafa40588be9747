"""The planner against measured peak memory: ``python scripts/bench_plan.py [overrides ...]``.

Runs ``permsparse.plan`` for the config the overrides compose, then a short learned run of it
(``learning.max_steps``, default 3; no baselines, nothing saved), and prints the planned per-device total beside the
peak measured during permutation training only (from the start of the first training step to the end of the last):

* on CUDA, ``torch.cuda.max_memory_allocated`` (what PyTorch's allocator handed out; the allocator's reserve and
  the CUDA context come on top and are not planned);
* on CPU, the growth of the process's peak RSS over its RSS at the start of training plus the tensors already
  resident then (weights, scores, masks, costs), which is noisy (the allocator keeps freed pages, Python and
  library memory move) and meant as a cross-check only: when an earlier phase (loading, calibration) peaked higher
  the growth reads 0 and the figure is a lower bound (a tiny model always reads so). Use a GPU for the 15 % check.

The issue's target is the planner within 15 % of the measured peak. Examples::

    python scripts/bench_plan.py                                     # SmolLM2, the default run (CPU)
    python scripts/bench_plan.py trainer=gpu                         # the same on a GPU
    python scripts/bench_plan.py model=tiny_llama dataset=tiny_text  # seconds, for a smoke test

Nothing here is asserted; results go to stdout (copy them to ``results/benchmarks/`` with the machine's name).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=3, help="training steps to measure (default 3)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from permsparse.lit.callbacks import PermutationLearning
    from permsparse.plan import format_bytes, plan_run
    from permsparse.run import train

    overrides = [*args.overrides, "perm=learned", f"learning.max_steps={args.steps}", "eval.dense_baseline=false",
                 "eval.identity_baseline=false", "save_pruned=false", "logger=none", "progress=false",
                 "learning.val_every_n_steps=null", "learning.checkpoint_every_n_steps=null", "plan.check=false"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(prefix="bench_plan_")
    plan = plan_run(cfg)
    print(plan.table(), flush=True)

    cuda = torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto")
    seen: dict[str, int] = {}
    start, end = PermutationLearning.on_train_batch_start, PermutationLearning.on_train_end

    def on_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if "resident" not in seen:
            learned = pl_module.permutations
            tensors = {id(t): t for t in [*pl_module.model.parameters(), *pl_module.model.buffers(),
                                          *learned.parameters(), *learned.buffers()]}
            for state in learned._states.values():
                tensors.update({id(t): t for t in [*state.scores_t.values(), *state.masks_t.values()]})
            tensors.update({id(m.workspace): m.workspace for m, _, _ in learned._masked if m.workspace is not None})
            seen["resident"] = sum(t.untyped_storage().nbytes() for t in tensors.values())
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            seen["rss"], seen["peak_rss"] = _rss(), _peak_rss()
        start(self, trainer, pl_module, batch, batch_idx)

    def on_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if cuda:
            torch.cuda.synchronize()
            seen["cuda_peak"] = torch.cuda.max_memory_allocated()
        seen["peak_rss_end"] = _peak_rss()
        end(self, trainer, pl_module)

    PermutationLearning.on_train_batch_start = on_start  # type: ignore[method-assign]
    PermutationLearning.on_train_end = on_end  # type: ignore[method-assign]
    train(cfg)

    planned = plan.total
    if cuda:
        measured, how = seen["cuda_peak"], "torch.cuda.max_memory_allocated during training"
    else:
        growth = max(seen["peak_rss_end"] - max(seen["peak_rss"], seen["rss"]), 0)
        measured, how = seen["resident"] + growth, "resident tensors + peak-RSS growth during training (noisy)"
    ratio = planned / measured if measured else float("nan")
    print(f"\nplanned per-device total   {format_bytes(planned):>12}")
    print(f"measured peak              {format_bytes(measured):>12}  ({how})")
    print(f"planned / measured         {ratio:>12.3f}  (target: within 0.85 .. 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
