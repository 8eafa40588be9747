"""Measuring a learned run from the inside: the seconds of each learning step and the peak memory of the steps.

Shared by ``scripts/bench_plan.py`` and ``scripts/bench_scale.py``. :class:`StepMeter` wraps
:meth:`LearnedPermutation.refresh <permsparse.permutation.learned.LearnedPermutation.refresh>`, which both learning
modes call at the start of every step (end to end through the Lightning callback, block-local in
:mod:`permsparse.block_local`'s loop), and watches every optimiser step through torch's global step hook. One
*step* runs from the start of the refresh (Sinkhorn, Hungarian, masks) to the end of the optimiser step (the forward
and backward passes run in between, or inside it under Lightning's closure). Validation, checkpoints, data loading
and the block-local caching fall outside the steps. Each :class:`~permsparse.permutation.learned.LearnedPermutations`
the run builds is one *stint*: end to end has one, block-local one per block.

Peak memory, per stint, over all its steps (the cold first one included, which is the one the planner plans):

* on CUDA, ``torch.cuda.max_memory_allocated`` after a reset at the stint's first step: what PyTorch's allocator
  handed out on the device (its reserve, fragmentation and the CUDA context come on top);
* on CPU, the bytes of the tensors resident on the "device" at the first step (the model's parameters and buffers
  end to end, the current block's block-local; the method's costs, potentials, scores, masks and gradient
  workspaces), each storage once, plus the growth of the process's peak RSS over its RSS at that moment. The peak is
  the kernel's high-water mark ``VmHWM``, reset at the first step by writing ``5`` to ``/proc/self/clear_refs``
  (Linux 4.0 and later); before the reset the garbage collector runs and ``malloc_trim(0)`` hands glibc's free pages
  back, so that memory freed by earlier phases does not hide the growth. Where the reset is refused the growth is
  over the process's lifetime peak, a lower bound (0 when an earlier phase peaked higher). Limits: the growth counts
  whatever else the process allocates meanwhile (oneDNN scratch, Python objects, the data batch) and glibc pages that
  freed tensors leave partly used; it misses memory that a freed tensor of an earlier step leaves in the allocator
  and a later one reuses, which ``malloc_trim`` does not cover between steps. ``tracemalloc`` would not see torch's
  allocations at all (they bypass Python's allocator).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MEASURED_RUN", "allocation_peak", "rss", "peak_rss", "reset_peak_rss", "trim_heap", "storage_bytes", "learned_tensors", "device_tensors",
           "Step", "Stint", "StepMeter"]

#: Hydra overrides of a short measured run (``train.py``'s flow): a learned run, no baselines, no saved model, no
#: logger, no progress bars, no mid-run validation or checkpoint, no plan check (the benchmark plans itself)
MEASURED_RUN = ["perm=learned", "eval.dense_baseline=false", "eval.identity_baseline=false", "save_pruned=false",
                "logger=none", "progress=false", "learning.val_every_n_steps=null",
                "learning.checkpoint_every_n_steps=null", "plan.check=false"]


def rss() -> int:
    """The process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """The process's peak resident set size (``VmHWM``; since the last :func:`reset_peak_rss`), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; never reset


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (``/proc/self/clear_refs``); ``False`` where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and hand glibc's free heap pages back to the system (``malloc_trim(0)``; no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """The bytes of the storages behind ``tensors``, each storage once (views and shared storages count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def learned_tensors(learned: Any) -> list[Tensor]:
    """Every tensor a :class:`~permsparse.permutation.learned.LearnedPermutations` holds between steps: its costs and
    Sinkhorn potentials, the pruner scores and masks of its groups, and the gradient workspaces of its linears."""
    out = [*learned.parameters(), *learned.buffers()]
    for state in learned._states.values():
        out += [*state.scores_t.values(), *state.masks_t.values(), *state.masks.values()]
    out += [m.workspace for m, _, _ in learned._masked if m.workspace is not None]
    return out


def device_tensors(learned: Any) -> list[Tensor]:
    """What sits on the device while ``learned`` trains: the model's parameters and buffers end to end, the parameters
    and buffers of its one block block-local (``learned.block``), plus :func:`learned_tensors`."""
    model: nn.Module = learned._model
    module = model if learned.block is None else learned.spec.blocks(model)[learned.block]
    return [*module.parameters(), *module.buffers(), *learned_tensors(learned)]


@dataclass
class Step:
    """One learning step: its stint (0, 1, ...), its index in the stint (0: the cold first step), the seconds from
    the start of the refresh to the end of the optimiser step, and the refresh's share of them."""

    stint: int
    index: int
    seconds: float
    refresh_seconds: float


@dataclass
class Stint:
    """One :class:`~permsparse.permutation.learned.LearnedPermutations` trained (the run end to end, or one block)."""

    resident: int = 0  # CPU: bytes on the "device" at the first step; CUDA: 0 (max_memory_allocated is absolute)
    baseline_rss: int = 0
    growth: int = 0  # CPU: peak RSS over baseline_rss during the steps
    cuda_peak: int = 0
    reset: bool = False  # CPU: whether the peak RSS could be reset at the first step
    steps: list[Step] = field(default_factory=list)
    #: CPU with ``StepMeter(allocations=True)``: the peak of torch's allocated bytes during the steps over those
    #: allocated at the first step's start, from the profiler's allocation events (None: not measured)
    alloc_growth: int | None = None

    @property
    def peak(self) -> int:
        """The stint's peak memory on its device (CUDA: allocated; CPU: resident tensors + peak RSS growth)."""
        return self.cuda_peak if self.cuda_peak else self.resident + self.growth

    @property
    def alloc_peak(self) -> int | None:
        """CPU, ``allocations=True``: resident tensors + the allocator's peak growth (exact, unlike the RSS)."""
        return None if self.alloc_growth is None else self.resident + self.alloc_growth


class StepMeter:
    """A context manager that times every learning step of the runs inside it and measures their peak memory.

    ``cuda``: the steps run on a CUDA device (synchronised around each step; the peak is ``max_memory_allocated``).
    ``resident``: the tensors counted as resident on a CPU "device" at a stint's first step (:func:`device_tensors`
    by default). ``allocations`` (CPU): also follow every allocation and free of torch's CPU allocator during each
    step through ``torch.profiler`` (``profile_memory``), which gives the exact peak of allocated tensor bytes
    (:attr:`Stint.alloc_peak`) beside the RSS estimate; it slows the steps, so time nothing with it. The profile runs
    from a stint's first step to the next stint (or the end), so allocations between steps move the level, and only
    the steps themselves can set the peak. After the block, :attr:`stints` holds one :class:`Stint` per trained
    :class:`~permsparse.permutation.learned.LearnedPermutations`.
    """

    def __init__(self, cuda: bool = False, resident: Callable[[Any], list[Tensor]] = device_tensors,
                 allocations: bool = False) -> None:
        self.cuda = cuda
        self.resident = resident
        self.allocations = allocations and not cuda
        self._profiler: Any = None
        self.stints: list[Stint] = []
        self._learned: Any = lambda: None  # a weak reference: the meter must not keep a finished block's state alive
        self._start: float | None = None
        self._refresh = 0.0
        self._stack = contextlib.ExitStack()

    # -- results -------------------------------------------------------------------------------------
    @property
    def steps(self) -> list[Step]:
        return [s for stint in self.stints for s in stint.steps]

    def timed(self, skip: int = 1) -> list[Step]:
        """The steps after the first ``skip`` of each stint (the warm-up)."""
        return [s for s in self.steps if s.index >= skip]

    @property
    def peak(self) -> int:
        """The largest stint peak (block-local: the largest block's)."""
        return max((s.peak for s in self.stints), default=0)

    @property
    def alloc_peak(self) -> int | None:
        """The largest stint's :attr:`Stint.alloc_peak` (``None`` unless measured with ``allocations=True``)."""
        peaks = [s.alloc_peak for s in self.stints if s.alloc_peak is not None]
        return max(peaks) if peaks else None

    # -- hooks ---------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _begin(self, learned: Any) -> None:
        if learned is not self._learned():  # a new stint: its memory from here
            self._close_profile()
            self._learned = weakref.ref(learned)
            stint = Stint()
            self.stints.append(stint)
            self._sync()
            trim_heap()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                stint.resident = storage_bytes(self.resident(learned))
                stint.reset = reset_peak_rss()
                stint.baseline_rss = rss()
                if self.allocations:
                    self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                            profile_memory=True)
                    self._profiler.__enter__()
        self._sync()
        if self._profiler is not None:
            torch.profiler.record_function(_STEP_BEGIN).__enter__().__exit__(None, None, None)
        self._start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        if self._start is None or not self.stints:  # an optimiser step outside a learning step
            return
        self._sync()
        seconds = time.perf_counter() - self._start
        stint = self.stints[-1]
        stint.steps.append(Step(len(self.stints) - 1, len(stint.steps), seconds, self._refresh))
        self._start = None
        if self.cuda:
            stint.cuda_peak = max(stint.cuda_peak, torch.cuda.max_memory_allocated())
        else:
            stint.growth = max(stint.growth, peak_rss() - stint.baseline_rss)
        if self._profiler is not None:
            torch.profiler.record_function(_STEP_END).__enter__().__exit__(None, None, None)

    def __enter__(self) -> StepMeter:
        from permsparse.permutation.learned import LearnedPermutation

        original = LearnedPermutation.refresh
        meter = self

        def refresh(method: Any, learned: Any, tau: float, generator: torch.Generator | None = None) -> float:
            meter._begin(learned)
            start = time.perf_counter()
            out = original(method, learned, tau, generator)
            meter._sync()
            meter._refresh = time.perf_counter() - start
            return out

        LearnedPermutation.refresh = refresh  # type: ignore[method-assign]
        self._stack.callback(setattr, LearnedPermutation, "refresh", original)
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(self._end)
        self._stack.callback(handle.remove)
        return self

    def _close_profile(self) -> None:
        """Stop the current stint's profiler and set its :attr:`Stint.alloc_growth`."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.stints[-1].alloc_growth = allocation_peak(profiler)

    def __exit__(self, *exc: Any) -> None:
        self._close_profile()
        self._stack.close()


_STEP_BEGIN, _STEP_END = "permsparse.measure.step_begin", "permsparse.measure.step_end"


def allocation_peak(profiler: Any, begin: str = _STEP_BEGIN, end: str = _STEP_END) -> int:
    """The highest level of torch's allocated CPU bytes, relative to the profile's start, inside the windows that
    ``record_function(begin)`` / ``record_function(end)`` marks open and close in a finished
    ``torch.profiler.profile(profile_memory=True)`` (no marks: over the whole profile). The level is the running
    sum of the profile's allocation events in time order; the profiler does not report frees of tensors allocated
    before it started, so those never lower it (an upper bound where such tensors are freed)."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, int]] = []  # (time, order: marks first, bytes or 0 / +1 open / -1 close)
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, 1, int(node.extra_fields.alloc_size)))
        elif node.name in (begin, end):
            events.append((node.start_time_ns, 0, 1 if node.name == begin else -1))
        stack.extend(node.children)
    marked = any(order == 0 for _, order, _ in events)
    level = high = 0
    inside = not marked
    for _, order, value in sorted(events):
        if order == 0:
            inside = value > 0
            if inside:
                high = max(high, level)
            continue
        level += value
        if inside:
            high = max(high, level)
    return high
