"""Seconds per learning step and peak memory of each learning mode at scale, planned beside measured.

    python scripts/bench_scale.py [--blocks K] [--steps 3] [--max-gib G] [--device cpu|cuda] [--out FILE] [overrides]

The model is the shape of ``model=`` (default SmolLM2-135M; ``model=llama3_2_1b``, ``model=llama2_7b``): the
``shape:`` block of its ``conf/model/*.yaml`` (the hub config's values, the planner's offline fallback), built with
random weights (:func:`permsparse.models.tiny.random_causal_lm`: nothing is downloaded or loaded) and only ``K`` of
its ``N`` blocks. ``--blocks`` gives ``K``; by default it is as many as fit ``--max-gib`` by the planner (default:
half the host's available memory, or 90 % of the GPU's free memory with ``--device cuda``), at most ``N``. A model
without a ``shape:`` block (``model=tiny_llama``) is built by its own loader with ``num_hidden_layers=K``.

For each learning mode (``learning.mode=e2e``, then ``block``) the script runs a short learned run of that model
through the project's own flow (``permsparse.run.train``: ``--steps`` optimiser steps, per block in block mode; the
ASCII tokenizer on ``dataset=tiny_text`` unless a ``dataset=`` is given; no baselines, nothing saved) and measures
it with :class:`permsparse.measure.StepMeter`:

* **seconds per step**: from the start of the cost refresh (Sinkhorn, Hungarian, masks) to the end of the optimiser
  step, the median over the steps after the first of the run (end to end) or of each block (block-local; the first
  is the warm-up: cold Sinkhorn, first-touch allocations); ``refresh`` is the refresh's share;
* **peak memory** over all the steps, the first included (it is the one the planner plans): on CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the tensors resident on the "device" at the first step plus the growth
  of the process's peak RSS, reset at that moment (``/proc/self/clear_refs``, after ``gc`` and ``malloc_trim``).
  The CPU figure is honest but noisy: whatever else the process allocates meanwhile counts, and memory an earlier
  step freed and a later one reuses does not show; ``tracemalloc`` would not see torch's tensors at all
  (:mod:`permsparse.measure`); a tiny model reads several times its plan, as a few MiB of library and
  allocator memory outweigh it (SmolLM2's shape read 1.00 to 1.08). Block-local, the largest block's peak.

``permsparse.plan`` plans the same configs at ``K`` blocks and at the full depth ``N`` (a meta-device model from the
config, no weights): the planned per-device total (``planned``), its host rows (``host``) and the FLOPs of a step
(``F``). Measured numbers are extrapolated to the full model by these rules (:func:`extrapolate`):

* **e2e seconds per step** = ``refresh x N / K + (step - refresh) x F_N / F_K``: the refresh covers every group, so it
  grows with the blocks; the rest (forward, backward, optimiser) grows with the planned FLOPs, which add one block's
  per block to the embeddings, head and loss paid once (``F_N / F_K`` tends to ``N / K`` as those become negligible).
  The run: ``x`` the full config's steps (``learning.*``, as ``permsparse.plan`` counts them).
* **block seconds per step** = as measured: a step is one block's and every block has the same shape. The run:
  ``x learning.block_steps x N``.
* **e2e peak** = ``measured x planned_N / planned_K``: the planned full-depth total, corrected by the measured /
  planned ratio at ``K`` blocks.
* **block peak** = as measured: one block's worth on the device. The host holds the rest (the model as loaded, the
  input cache, one block's dense copy), which grows with the model (column ``host``, planned).

Run time covers the learning steps only: validation, checkpoints, the block-local caching, calibration and
evaluation come on top. Nothing is asserted; the table goes to stdout (``--out FILE`` writes it there too, ``--json
FILE`` the raw numbers; copy them to ``results/benchmarks/`` with the machine's name). Examples::

    python scripts/bench_scale.py                                  # SmolLM2-135M's shape on this CPU
    python scripts/bench_scale.py model=llama3_2_1b --blocks 2
    python scripts/bench_scale.py model=llama2_7b --device cuda --out results/benchmarks/bench_scale_7b.txt
    python scripts/bench_scale.py model=tiny_llama --blocks 1 --steps 2   # seconds, a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from permsparse.config import accelerator_kind
from permsparse.measure import MEASURED_RUN
from permsparse.plan import MODES, Plan, compose_config, format_bytes, format_flops, meta_model, plan_run


@dataclass
class Row:
    """One line of the table: a mode at ``blocks`` blocks, measured (``kind="measured"``) or extrapolated
    (``"full"``). ``steps``: the timed steps (measured) or the run's steps per device, per block in block mode
    (full); ``run_seconds``: ``seconds x steps`` (x blocks for a full block-local run)."""

    mode: str
    kind: str
    blocks: int
    seconds: float
    refresh: float
    steps: int
    run_seconds: float
    flops: float  # planned FLOPs of one step (model forward + backward + permutation gradient + Sinkhorn)
    planned: int  # planned per-device total
    peak: int  # measured or extrapolated peak memory on the device
    host: int  # planned host rows


@dataclass
class Measured:
    """What one short run measured: the median step and refresh seconds, the timed steps, the peak memory."""

    seconds: float
    refresh: float
    steps: int
    peak: int
    peak_reset: bool  # CPU: the peak RSS could be reset at each first step (else the peak is a lower bound)
    resident: int = 0  # CPU: of the peak, the tensors resident at the first step (the largest stint's)
    growth: int = 0  # CPU: of the peak, the peak-RSS growth during the steps


# --------------------------------------------------------------------------------------------- configs


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (model=llama2_7b ...)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="blocks of the random model (default: as many as fit --max-gib by the planner)")
    parser.add_argument("--steps", type=int, default=3,
                        help="optimiser steps per run (per block in block mode); the first is not timed (default 3)")
    parser.add_argument("--max-gib", type=float, default=None,
                        help="memory budget for choosing --blocks, GiB (default: half the available host memory; "
                             "--device cuda: 90%% of the GPU's free memory)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda adds trainer=gpu (unless a trainer= is given) and measures max_memory_allocated")
    parser.add_argument("--modes", default=",".join(MODES), help=f"learning modes to run (default {','.join(MODES)})")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers to this file")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is the warm-up, not timed")
    if args.blocks is not None and args.blocks < 1:
        parser.error("--blocks must be at least 1")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    return args


def _given(overrides: Sequence[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


class Shapes:
    """The configs of one model shape: the user's overrides, the random-weight model node at ``K`` blocks, the short
    measured run (:meth:`run_cfg`) and the full-depth plan (:meth:`full_cfg`)."""

    def __init__(self, overrides: Sequence[str], steps: int, device: str) -> None:
        self.overrides = list(overrides)
        if not _given(overrides, "dataset"):
            self.overrides.append("dataset=tiny_text")  # the ASCII tokenizer's data: ids below every vocabulary
        if device == "cuda" and not _given(overrides, "trainer"):
            self.overrides.append("trainer=gpu")
        self.steps = steps
        base = compose_config([*self.overrides, "perm=learned"])
        self.cuda = accelerator_kind(base) == "cuda"  # --device cuda, or a trainer= on a GPU
        self.name = str(base.model.name)
        self.seed = int(base.seed)
        self.load = OmegaConf.to_container(base.model.load, resolve=True)
        shape = base.model.get("shape")
        self.shape = OmegaConf.to_container(shape, resolve=True) if shape is not None else None
        if self.shape is not None:
            self.blocks_full = int(self.shape["num_hidden_layers"])
            self.source = f"the shape: block of conf/model/{self.name}.yaml, random weights"
        else:
            from permsparse.models.binding import get_spec

            model, _ = meta_model(base.model)
            self.blocks_full = len(get_spec(model).blocks(model))
            self.source = f"{self.load['_target_']} with num_hidden_layers=K, random weights"
        batch, seq_len = int(base.learning.batch_size), base.learning.get("seq_len")
        self.batch = f"{batch} x {seq_len or base.dataset.datamodule.get('seq_len') or '-'}"
        self._batch_size = batch

    def model_node(self, blocks: int) -> dict[str, Any]:
        """``model.load`` for a random-weight model of this shape with ``blocks`` blocks."""
        assert isinstance(self.load, dict)
        if self.shape is None:
            return {**self.load, "num_hidden_layers": blocks}
        node = {"_target_": "permsparse.models.tiny.random_causal_lm", "seed": self.seed, **self.shape,
                "num_hidden_layers": blocks}
        if self.load.get("dtype") is not None:
            node["dtype"] = str(self.load["dtype"]).removeprefix("torch.")
        return node

    def _cfg(self, mode: str, blocks: int, extra: Sequence[str]) -> DictConfig:
        cfg = compose_config([*self.overrides, *extra, f"learning.mode={mode}"])
        with open_dict(cfg):
            cfg.model.load = self.model_node(blocks)
            if self.shape is not None:
                cfg.model.tokenizer = {"_target_": "permsparse.models.tiny.tiny_tokenizer"}
        return cfg

    def run_cfg(self, mode: str, blocks: int) -> DictConfig:
        """The short measured run: ``steps`` optimiser steps (per block), as many training windows, one validation
        batch."""
        steps = self.steps
        budget = [f"learning.max_steps={steps}", f"learning.block_steps={steps}", "learning.max_epochs=1",
                  f"learning.train_samples={steps * self._batch_size}", f"learning.val_samples={self._batch_size}"]
        return self._cfg(mode, blocks, [*MEASURED_RUN, *budget])

    def full_cfg(self, mode: str) -> DictConfig:
        """The full-depth run as the overrides describe it (its learning budget untouched), for the plan."""
        return self._cfg(mode, self.blocks_full, ["perm=learned"])


# ---------------------------------------------------------------------------------------- plan and fit


def plan_flops(plan: Plan) -> float:
    """The planned FLOPs of one step, as the plan's table sums them (Hungarian, on the host, left out)."""
    return sum(value for name, value, _ in plan.flops if not name.startswith("Hungarian"))


def host_bytes(plan: Plan) -> int:
    return sum(item.bytes for item in plan.host)


def footprint(plan: Plan, mode: str, cpu: bool) -> int:
    """The memory a run of ``plan`` needs where it runs: on a GPU its per-device total; on a CPU the device and the
    host are one memory, so the total and the host rows, less the host rows that are the device's own tensors there
    (end to end the model as loaded and the scores and masks built for it, block-local the block's weights)."""
    if not cpu:
        return plan.total
    shared = {"model as loaded", "scores + masks while building"} if mode == "e2e" else set()
    own = sum(i.bytes for i in plan.host if i.name in shared)
    if mode == "block":
        own += plan.item("frozen weights").bytes
    return plan.total + host_bytes(plan) - own


def default_budget(cuda: bool) -> int:
    if cuda:
        free, _ = torch.cuda.mem_get_info()
        return int(0.9 * free)
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return int(0.5 * info.get("MemAvailable", info["MemTotal"]))


def fitting_blocks(need: Callable[[int], int], full: int, budget: int) -> int:
    """The most blocks ``K <= full`` whose ``need(K)`` fits ``budget``; ``need`` is affine in ``K`` (every block the
    same shape), so it is evaluated at 1 and 2 blocks only and checked at the answer. 0: not even one block fits."""
    one = need(1)
    if one > budget:
        return 0
    if full == 1:
        return 1
    per_block = max(need(2) - one, 1)
    k = min(full, 1 + (budget - one) // per_block)
    while k > 1 and need(k) > budget:
        k -= 1
    return int(k)


# -------------------------------------------------------------------------------------------- measure


def measure(cfg: DictConfig, cuda: bool) -> Measured:
    """A short learned run of ``cfg`` through :func:`permsparse.run.train`, timed and measured by
    :class:`~permsparse.measure.StepMeter`."""
    from permsparse.measure import StepMeter, trim_heap
    from permsparse.run import train

    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(prefix="bench_scale_")
    trim_heap()
    with StepMeter(cuda) as meter, contextlib.redirect_stdout(sys.stderr):  # the run's own table: not ours
        train(cfg)
    timed = meter.timed(skip=1)
    if not timed:
        raise RuntimeError(f"learning.mode={cfg.learning.mode}: no step after the warm-up was recorded")
    top = max(meter.stints, key=lambda s: s.peak)
    return Measured(seconds=statistics.median(s.seconds for s in timed),
                    refresh=statistics.median(s.refresh_seconds for s in timed), steps=len(timed), peak=top.peak,
                    peak_reset=cuda or all(s.reset for s in meter.stints), resident=top.resident, growth=top.growth)


def extrapolate(mode: str, measured: Measured, plan_k: Plan, plan_n: Plan, blocks_k: int, blocks_n: int) -> Row:
    """The full model's row from the measured one (the rules of the module docstring)."""
    flops_k, flops_n = plan_flops(plan_k), plan_flops(plan_n)
    if mode == "e2e":
        refresh = measured.refresh * blocks_n / blocks_k
        seconds = refresh + (measured.seconds - measured.refresh) * flops_n / flops_k
        peak = round(measured.peak * plan_n.total / plan_k.total)
        run = seconds * plan_n.steps
    else:
        refresh, seconds, peak = measured.refresh, measured.seconds, measured.peak
        run = seconds * plan_n.steps * blocks_n
    return Row(mode, "full", blocks_n, seconds, refresh, plan_n.steps, run, flops_n, plan_n.total, peak,
               host_bytes(plan_n))


# ---------------------------------------------------------------------------------------------- table


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _machine(cuda: bool) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    where = f"{cpu}, {torch.get_num_threads()} torch threads"
    if cuda:
        where = f"{torch.cuda.get_device_name(0)}; host {where}"
    return f"{where}; torch {torch.__version__}"


def ratio(row: Row) -> str:
    """Measured peak / planned total; ``-`` on a full row (extrapolated: the measured row's ratio by construction)."""
    return f"{row.peak / row.planned:.3f}" if row.kind == "measured" and row.planned else "-"


def table(title: list[str], rows: list[Row]) -> str:
    head = (f"{'mode':<6}{'row':<10}{'blocks':>7}{'s/step':>10}{'refresh':>9}{'steps':>8}{'run':>10}"
            f"{'FLOP/step':>14}{'planned':>12}{'peak':>12}{'peak/plan':>10}{'host':>12}")
    lines = [*title, "", head]
    for r in rows:
        steps = f"{r.steps}" + (f"x{r.blocks}" if r.kind == "full" and r.mode == "block" else "")
        lines.append(f"{r.mode:<6}{r.kind:<10}{r.blocks:>7}{r.seconds:>10.3f}{r.refresh:>9.3f}{steps:>8}"
                     f"{_duration(r.run_seconds):>10}{format_flops(r.flops):>14}{format_bytes(r.planned):>12}"
                     f"{format_bytes(r.peak):>12}{ratio(r):>10}{format_bytes(r.host):>12}")
    lines += [
        "",
        "s/step: median seconds from the cost refresh to the end of the optimiser step, the warm-up step of the run /",
        "  of each block left out; refresh: its Sinkhorn + Hungarian + masks share. steps: timed (measured) or the full",
        "  run's per device (x blocks: block-local). run: s/step x steps, learning steps only. planned: the planner's",
        "  per-device total; peak: measured (CUDA max_memory_allocated; CPU resident tensors + reset peak-RSS growth),",
        "  or extrapolated (full); host: the planner's host rows. Full rows: e2e s/step = refresh x N/K + rest x",
        "  F_N/F_K (F: planned FLOP/step), peak = measured x planned_N / planned_K; block s/step and peak as measured.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the planner's config sources: local only, the shape block
    shapes = Shapes(args.overrides, args.steps, args.device)
    cuda = shapes.cuda
    if cuda and not torch.cuda.is_available():
        print("error: the run targets a GPU but no CUDA device is available", file=sys.stderr)
        return 2
    plans: dict[tuple[str, int], Plan] = {}

    def plan_at(mode: str, blocks: int) -> Plan:
        if (mode, blocks) not in plans:
            plans[mode, blocks] = plan_run(shapes.run_cfg(mode, blocks))
        return plans[mode, blocks]

    budget = int(args.max_gib * 2**30) if args.max_gib is not None else default_budget(cuda)
    blocks = args.blocks
    if blocks is None:
        blocks = min(fitting_blocks(lambda k, m=m: footprint(plan_at(m, k), m, not cuda), shapes.blocks_full, budget)
                     for m in args.modes)
        if blocks == 0:
            print(f"error: not even one block of {shapes.name} fits {format_bytes(budget)} by the planner; give a "
                  "larger --max-gib, or --blocks 1 to run anyway", file=sys.stderr)
            return 2
    blocks = min(blocks, shapes.blocks_full)

    rows: list[Row] = []
    raw: dict[str, Any] = {}
    for mode in args.modes:
        print(f"bench_scale: {shapes.name}, learning.mode={mode}, {blocks} of {shapes.blocks_full} blocks ...",
              file=sys.stderr, flush=True)
        plan_k, plan_n = plan_at(mode, blocks), plan_run(shapes.full_cfg(mode))
        got = measure(shapes.run_cfg(mode, blocks), cuda)
        rows.append(Row(mode, "measured", blocks, got.seconds, got.refresh, got.steps, got.seconds * got.steps,
                        plan_flops(plan_k), plan_k.total, got.peak, host_bytes(plan_k)))
        rows.append(extrapolate(mode, got, plan_k, plan_n, blocks, shapes.blocks_full))
        raw[mode] = {"measured": dataclasses.asdict(got), "planned_k": plan_k.total, "planned_n": plan_n.total,
                     "flops_k": plan_flops(plan_k), "flops_n": plan_flops(plan_n), "steps_n": plan_n.steps}

    lower = any(not raw[m]["measured"]["peak_reset"] for m in raw)
    title = [f"bench_scale: model={shapes.name} ({shapes.source}), {shapes.blocks_full} blocks; measured on "
             f"{blocks} (K), {args.steps} steps per run / block (the first not timed), batch {shapes.batch}",
             f"  {'cuda' if cuda else 'cpu'}: {_machine(cuda)}; budget {format_bytes(budget)}"
             + ("" if args.blocks is None else " (unused: --blocks given)")
             + ("; the peak RSS could not be reset, CPU peaks are lower bounds" if lower else "")]
    text = table(title, rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": shapes.name, "blocks": blocks, "blocks_full": shapes.blocks_full,
                                         "device": args.device, "steps": args.steps,
                                         "rows": [dataclasses.asdict(r) for r in rows], "modes": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
