"""The command line: configuration and input errors print one line (no traceback) and exit with status 2."""

from __future__ import annotations

import logging
import os
import runpy
import subprocess
import sys

import pytest
from conftest import ROOT


def _train(*overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "train.py", *overrides, "hydra.run.dir=/tmp/permsparse-cli-test"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _train_in_process(capsys, monkeypatch, tmp_path, *overrides: str) -> tuple[int, str]:
    """``python train.py <overrides>`` run in this interpreter (train.py's own ``__main__`` through Hydra's real
    command-line path, without the 10 s of a fresh interpreter's imports): its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["train.py", *overrides, f"hydra.run.dir={tmp_path}"])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:  # Hydra configured the job's logging (a console and a file handler); later tests keep pytest's
        root.handlers[:], root.level = handlers, level
    return exit_info.value.code, capsys.readouterr().err


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and "Error executing job" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def test_the_vit_b_command_offline_says_where_to_point_in_one_line():
    # model=vit_b brings dataset=imagenet, a local ImageFolder that this machine does not have
    proc = _train("model=vit_b", "sparsity=2:4", "perm=learned")
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert line.startswith("error: dataset.datamodule.root is not set") and "dataset.datamodule.root=" in line


@pytest.mark.parametrize("overrides,needle", [
    (["sparsity.n=5"], "N must not exceed M"),
    (["perm.method.mode=medium"], "perm.method.mode='medium' is invalid"),
    (["model=vit_fmnist", "dataset=shakespeare"], "is a image_classification model but dataset=shakespeare"),
    (["model=hf_causal_lm"], "model.name_or_path is not set: model=hf_causal_lm needs model.name_or_path="),
])
def test_config_errors_print_their_message_alone(overrides, needle, capsys, monkeypatch, tmp_path):
    # in process; the test above runs the same path in a fresh interpreter
    code, stderr = _train_in_process(capsys, monkeypatch, tmp_path, *overrides)
    assert code == 2
    assert needle in _one_line(stderr)


def test_every_model_brings_its_default_dataset():
    from conftest import CONF, compose_cfg

    expected = {"vit_b": "imagenet", "vit_l": "imagenet", "vit_fmnist": "fashion_mnist", "vit_digits": "digits",
                "tiny_vit": "digits", "smollm2_135m": "shakespeare", "llama3_2_1b": "wikitext2",
                "llama2_7b": "wikitext2", "llama2_70b": "wikitext2", "tiny_llama": "tiny_text",
                "tiny_qwen2": "tiny_text", "tiny_mistral": "tiny_text", "tiny_phi": "tiny_text", "tiny_opt": "tiny_text",
                "tiny_gemma3": "tiny_text", "tiny_phi3": "tiny_text", "tiny_qwen2_moe": "tiny_text",
                "tiny_qwen2_5_vl": "tiny_text", "hf_causal_lm": "shakespeare", "qwen2_5_vl_3b": "c4_wikitext2"}
    assert sorted(expected) == sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    for model, dataset in expected.items():
        assert compose_cfg([f"model={model}"], ROOT / "x").dataset.name == dataset
        cfg = compose_cfg([f"model={model}", "dataset=digits"], ROOT / "x")  # still overridable
        assert cfg.dataset.name == "digits" and cfg.model.name == model
