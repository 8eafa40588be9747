"""Run a multi-process worker script (``tests/helpers/*_worker.py``) in a fresh interpreter and read its result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["run_worker"]


def run_worker(worker: Path, tmp_path: Path, devices: int, per_device_batch: int, extra: tuple[str, ...] = ()) -> dict:
    """``python <worker> --devices D --per-device-batch B --out <file> [extra...]`` with one thread per process;
    its ``torch.save``d result dict (a failing worker fails the test with the end of its stderr)."""
    out = tmp_path / f"result_{devices}_{'_'.join(extra)}.pt"
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(worker), "--devices", str(devices), "--per-device-batch", str(per_device_batch),
         "--out", str(out), *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)
