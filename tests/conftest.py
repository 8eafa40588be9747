"""Shared fixtures: Hydra config composition for tiny end-to-end runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_cfg(overrides: list[str], output_dir: Path | None = None, shallow_greedy: bool = True) -> DictConfig:
    """Compose ``conf/train.yaml`` with overrides, as ``python train.py <overrides>`` would.

    One difference, unless ``shallow_greedy=False``: a ``perm=greedy`` config runs greedy CP without its
    perturbation phase (``perm.method.perturb_rounds_per_group=0``) unless the overrides set that key. The tiny models' layers are
    the size the phase spends most on (about 1 s each); the pipeline tests need a greedy permutation, not the
    deepest one, and ``tests/test_channel_swap.py`` tests the phase itself."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=output_dir is None)
    if shallow_greedy and cfg.perm.name == "greedy" and not any(o.startswith("perm.method.perturb_rounds_per_group=") for o in overrides):
        with open_dict(cfg):
            cfg.perm.method.perturb_rounds_per_group = 0
    if output_dir is not None:
        with open_dict(cfg):
            cfg.output_dir = str(output_dir)
    return cfg


TINY_LM = ["model=tiny_llama", "dataset=tiny_text", "calibration.samples=4", "calibration.batch_size=2",
           "eval.batch_size=2", "learning.train_samples=8", "learning.val_samples=2", "learning.batch_size=2",
           "learning.seq_len=null", "learning.val_every_n_steps=null", "logger=none", "progress=false"]
TINY_VIT = ["model=tiny_vit", "dataset=digits", "calibration.samples=32", "calibration.batch_size=16",
            "eval.batch_size=256", "learning.train_samples=64", "learning.val_samples=32", "learning.batch_size=16",
            "learning.val_every_n_steps=null", "logger=none", "progress=false"]


@pytest.fixture
def tiny_lm_overrides() -> list[str]:
    return list(TINY_LM)


@pytest.fixture
def tiny_vit_overrides() -> list[str]:
    return list(TINY_VIT)
