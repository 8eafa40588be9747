"""The planner against measured peak memory: ``python scripts/bench_plan.py [overrides ...]``.

Runs ``permsparse.plan`` for the config the overrides compose, then a short learned run of it
(``learning.max_steps``, default 3; no baselines, nothing saved), and prints the planned per-device total beside the
peak measured during the learning steps only (:class:`permsparse.measure.StepMeter`: from the start of each
step's cost refresh to the end of its optimiser step, the cold first step included; block-local, the largest block's):

* on CUDA, ``torch.cuda.max_memory_allocated`` (what PyTorch's allocator handed out; the allocator's reserve and
  the CUDA context come on top and are not planned);
* on CPU, the tensors resident at the first step (weights, scores, masks, costs, workspaces) plus the peak of
  torch's allocated CPU bytes during the steps over the level at that moment, from ``torch.profiler``'s allocation
  events (``StepMeter(allocations=True)``): every tensor allocation and free, as CUDA's allocator counts them. The
  growth of the process's peak RSS is printed beside it as a cross-check; it is noisier (other allocations of the
  process count, glibc keeps partly used pages; :mod:`permsparse.measure` lists the limits). The profiler slows the
  steps: this script measures memory, never time.

The issue's target is the planner within 15 % of the measured peak. Examples::

    python scripts/bench_plan.py                                     # SmolLM2, the default run (CPU)
    python scripts/bench_plan.py trainer=gpu                         # the same on a GPU
    python scripts/bench_plan.py model=tiny_llama dataset=tiny_text  # seconds, for a smoke test

Nothing here is asserted; results go to stdout (copy them to ``results/benchmarks/`` with the machine's name).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=3, help="training steps to measure (default 3)")
    args = parser.parse_args()

    from omegaconf import open_dict

    from permsparse.config import accelerator_kind
    from permsparse.measure import MEASURED_RUN, StepMeter
    from permsparse.plan import compose_config, format_bytes, plan_run
    from permsparse.run import train

    cfg = compose_config([*args.overrides, *MEASURED_RUN, f"learning.max_steps={args.steps}"])
    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(prefix="bench_plan_")
    plan = plan_run(cfg)
    print(plan.table(), flush=True)

    cuda = accelerator_kind(cfg) == "cuda" and torch.cuda.is_available()
    with StepMeter(cuda, allocations=True) as meter:
        train(cfg)

    planned = plan.total
    print(f"\nplanned per-device total   {format_bytes(planned):>12}")
    if cuda:
        measured = meter.peak
        print(f"measured peak              {format_bytes(measured):>12}  (torch.cuda.max_memory_allocated during the "
              "learning steps)")
    else:
        measured = meter.alloc_peak
        rss_how = "resident tensors + peak-RSS growth during the learning steps (noisy, cross-check only)"
        if not all(s.reset for s in meter.stints):
            rss_how += "; the peak RSS could not be reset: a lower bound"
        print(f"measured peak              {format_bytes(measured):>12}  (resident tensors + the peak of torch's "
              "allocated CPU bytes during the learning steps, from the profiler's allocation events)")
        print(f"RSS estimate               {format_bytes(meter.peak):>12}  ({rss_how})")
    ratio = planned / measured if measured else float("nan")
    print(f"planned / measured         {ratio:>12.3f}  (target: within 0.85 .. 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
