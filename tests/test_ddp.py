"""DDP on 2 CPU processes (gloo) learns the same permutations as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from helpers.workers import run_worker

WORKER = ROOT / "tests" / "helpers" / "ddp_worker.py"


def _run(tmp_path, devices: int, per_device_batch: int) -> dict:
    return run_worker(WORKER, tmp_path, devices, per_device_batch)


def test_ddp_two_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    single = _run(tmp_path, devices=1, per_device_batch=4)
    ddp = _run(tmp_path, devices=2, per_device_batch=2)
    assert single["steps"] == ddp["steps"] == 8
    # SGD (not Adam, whose first steps turn rounding-level gradient differences into +-lr moves): after
    # 8 steps the costs agree to float32 rounding amplified by lr=50, and every hard permutation is equal.
    for key, cost in single["costs"].items():
        assert torch.allclose(cost, ddp["costs"][key], atol=5e-3), key
    assert set(single["perms"]) == set(ddp["perms"])
    for name, perm in single["perms"].items():
        assert torch.equal(perm, ddp["perms"][name]), name
    assert abs(single["best_loss"] - ddp["best_loss"]) < 1e-4
    # the costs moved, so the comparison is not between two untrained states
    assert any(h["changed_channels"] > 0 for h in single["history"])


def test_ddp_equals_one_process_under_the_default_base(tmp_path):
    """The default frame (global RIA CP, gradients gathered into it) averages across ranks like the plain path:
    two steps agree to float32 rounding (later steps reach a Hungarian near-tie, see the worker)."""
    single = run_worker(WORKER, tmp_path, 1, 4, ("--base", "ria", "--max-steps", "2"))
    ddp = run_worker(WORKER, tmp_path, 2, 2, ("--base", "ria", "--max-steps", "2"))
    assert single["steps"] == ddp["steps"] == 2
    for key, cost in single["costs"].items():
        assert torch.allclose(cost, ddp["costs"][key], atol=5e-5), key
    for name, perm in single["perms"].items():
        assert torch.equal(perm, ddp["perms"][name]), name
    moved = max(float((cost - single["start_costs"][key]).abs().max()) for key, cost in single["costs"].items())
    assert moved > 1e-2  # two steps at lr 50 moved the costs far beyond the tolerance


@pytest.mark.slow  # ~55 s, two train.py processes under gloo; in the default run the tests above check DDP's learning
# equivalence and test_calibration.py's test_all_reduce_stats_sums_across_ranks the summed (sharded) statistics
def test_train_py_under_ddp_shards_calibration_and_reports_once(tmp_path):
    """``trainer=ddp`` through the real entry point: 2 gloo ranks each calibrate half of the data; the summed
    statistics give the same Wanda masks, so the dense and identity rows equal a single-process run's."""
    import json

    from conftest import TINY_LM

    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, str(ROOT / "train.py"), *TINY_LM, "perm=learned", "calibration.samples=8",
            "learning.batch_size=1"]
    runs = {}
    for name, extra in (("ddp", ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]), ("single", [])):
        out = tmp_path / name
        proc = subprocess.run([*base, *extra, f"hydra.run.dir={out}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = json.loads((out / "results.json").read_text())
    ddp, single = runs["ddp"], runs["single"]
    assert ddp["calibration"]["sharded_across_ranks"] and not single["calibration"]["sharded_across_ranks"]
    assert ddp["metrics"]["dense"] == single["metrics"]["dense"]
    for key, value in single["metrics"]["identity"].items():
        assert abs(ddp["metrics"]["identity"][key] - value) <= 1e-6 * value, key
    assert ddp["learning"]["steps"] == 4 and single["learning"]["steps"] == 8  # 8 windows, 1 per rank per step
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").exists()  # rank 1 ran, and did not write results
