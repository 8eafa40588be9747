"""Atomic writes: a crash mid-write leaves the previous file intact and no temporary file behind."""

import json
import os

import pytest
import torch

from permsparse.utils.io import atomic_torch_save, atomic_write, atomic_write_json, read_json


def test_json_round_trip_with_tensors_and_nan(tmp_path):
    path = atomic_write_json(tmp_path / "results.json", {"a": torch.tensor([1, 2]), "b": float("nan"), "c": 3})
    data = read_json(path)
    assert data["a"] == [1, 2] and data["c"] == 3 and data["b"] != data["b"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any other file, not mkstemp's 0600


def test_a_crash_mid_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"version": 1})

    def crash(f):
        f.write(b'{"version": 2, "trunc')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_torch_save_is_atomic_too(tmp_path):
    path = tmp_path / "perms.pt"
    atomic_torch_save({"g": torch.arange(4)}, path)
    assert torch.equal(torch.load(path)["g"], torch.arange(4))
    with pytest.raises((TypeError, AttributeError)):
        atomic_torch_save({"g": lambda: None}, path)  # not picklable: fails before the rename
    assert torch.equal(torch.load(path)["g"], torch.arange(4))
