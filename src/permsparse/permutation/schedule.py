"""Temperature annealing for Sinkhorn: exponential (default), linear, cosine from ``start`` to ``end``, or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TemperatureSchedule", "SCHEDULES"]

#: the schedules ``perm.method.tau_schedule`` accepts (``constant`` holds ``start``; ``end`` is then unused)
SCHEDULES = ("exponential", "linear", "cosine", "constant")


@dataclass
class TemperatureSchedule:
    """``tau(step)`` going from ``start`` at step 0 to ``end`` at ``total_steps`` (held after)."""

    start: float = 1.0
    end: float = 0.05
    total_steps: int = 1000
    kind: str = "exponential"

    def __post_init__(self) -> None:
        if self.start <= 0 or self.end <= 0:
            raise ValueError(f"temperatures must be > 0, got start={self.start}, end={self.end}")
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown temperature schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"temperature schedule needs total_steps >= 1, got {self.total_steps}")

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.total_steps) / self.total_steps
        if self.kind == "constant":
            return self.start
        if self.kind == "exponential":
            return self.start * (self.end / self.start) ** t
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * t))
