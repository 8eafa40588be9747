"""Resumable and reproducible runs (issue: reliability): Ctrl-C, checkpoint, resume, same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_LM, compose_cfg

from permsparse.lit import callbacks as cb
from permsparse.run import train

# 8 steps, validation every 2, checkpoints every 3; Gumbel noise so the callback's generator state matters.
LEARNED = [*TINY_LM, "perm=learned", "learning.train_samples=16", "learning.val_every_n_steps=2",
           "learning.checkpoint_every_n_steps=3", "perm.method.gumbel_scale=0.5"]


def _ctrl_c_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Send a real SIGINT to this process at the end of training step ``step``."""
    original = cb.PermutationLearning.on_train_batch_end

    def end_of_step(self, trainer, *args, **kwargs):
        if trainer.global_step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, trainer, *args, **kwargs)

    monkeypatch.setattr(cb.PermutationLearning, "on_train_batch_end", end_of_step)


def _final_costs(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return state["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("straight")
    return run, train(compose_cfg(LEARNED, run))


# step 3: a checkpoint step without validation; step 4: Ctrl-C at a validation step (saved after validating);
# step 5: Ctrl-C between checkpoints and validations.
@pytest.mark.parametrize("stop_at", [3, 4, 5])
def test_interrupted_then_resumed_run_ends_like_an_uninterrupted_one(tmp_path, monkeypatch, uninterrupted, stop_at):
    straight_dir, straight = uninterrupted
    _ctrl_c_at(monkeypatch, stop_at)
    with pytest.raises(cb.TrainingInterrupted, match=f"interrupted after step {stop_at}"):
        train(compose_cfg(LEARNED, tmp_path))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stop_at
    assert not (tmp_path / "results.json").exists()  # nothing is reported for a run that did not finish
    monkeypatch.undo()

    resumed = train(compose_cfg([*LEARNED, f"resume={tmp_path}"], tmp_path))

    assert resumed["learning"]["steps"] == straight["learning"]["steps"] == 8
    assert resumed["learning"]["history"] == straight["learning"]["history"]  # every validation, bit for bit
    costs, expected = _final_costs(tmp_path), _final_costs(straight_dir)
    assert costs.keys() == expected.keys() and all(torch.equal(costs[k], expected[k]) for k in costs)
    perms, expected_perms = torch.load(tmp_path / "perms.pt"), torch.load(straight_dir / "perms.pt")
    assert all(torch.equal(perms[g], expected_perms[g]) for g in expected_perms)
    assert resumed["metrics"] == straight["metrics"]


def test_the_same_seed_gives_the_same_permutations_and_metrics(tmp_path, uninterrupted):
    straight_dir, straight = uninterrupted
    again = train(compose_cfg(LEARNED, tmp_path / "again"))
    assert again["metrics"] == straight["metrics"]
    assert again["learning"]["history"] == straight["learning"]["history"]
    first, second = torch.load(straight_dir / "perms.pt"), torch.load(tmp_path / "again" / "perms.pt")
    assert all(torch.equal(first[g], second[g]) for g in first)
    assert again["seed"] == 0 and again["config"]["seed"] == 0 and "torch" in again["versions"]

    other = train(compose_cfg([*LEARNED, "seed=1"], tmp_path / "other"))
    assert other["learning"]["history"] != straight["learning"]["history"]  # the seed does reach the run


def test_ctrl_c_in_train_py_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    """The real entry point in a child process, stopped with SIGINT as a terminal's Ctrl-C would."""
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), *TINY_LM, "perm=learned", "learning.train_samples=4000",
            "learning.checkpoint_every_n_steps=2", f"hydra.run.dir={run}"]
    child = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint appeared while training"
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert "Ctrl-C: finishing this step" in out + err  # Hydra's job logging writes to stdout
    assert f"resume={run}" in err
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 2 <= state["global_step"] < 2000  # stopped mid-training, at a step boundary
    assert not (run / "results.json").exists()
