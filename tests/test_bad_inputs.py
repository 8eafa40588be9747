"""A table of bad inputs: each fails at once with a message that names what is wrong (issue: reliability)."""

import pytest
import torch
from torch import nn

from permsparse.data.text import eval_windows, perplexity, train_windows
from permsparse.data.vision import top1
from permsparse.models.binding import get_spec
from permsparse.permutation.cost import LearnableCost
from permsparse.permutation.hungarian import hungarian
from permsparse.permutation.schedule import TemperatureSchedule
from permsparse.permutation.sinkhorn import sinkhorn
from permsparse.prune import prune_model
from permsparse.sparsity.nm import NMPattern, nm_mask
from permsparse.sparsity.pruners import WandaPruner
from permsparse.sparsity.sparsegpt import SparseGPTPruner


def _tiny_llama():
    from permsparse.models.tiny import tiny_llama

    return tiny_llama(seed=0)


CASES = [
    ("pattern with a dash", lambda: NMPattern.parse("2-4"), "cannot parse N:M pattern '2-4'"),
    ("N larger than M", lambda: NMPattern.parse("5:4"), "N must not exceed M"),
    ("zero kept", lambda: NMPattern.parse("0:4"), "N must be >= 1"),
    ("negative M", lambda: NMPattern.parse("2:-4"), "M must be >= 1"),
    ("3-D weight", lambda: nm_mask(torch.rand(2, 2, 4), "2:4", name="blk.fc"), "blk.fc: N:M sparsity needs a 2-D"),
    ("d_in not divisible by M", lambda: nm_mask(torch.rand(2, 6), "2:4", name="fc2"), "fc2: d_in=6 is not divisible by M=4"),
    ("NaN scores", lambda: nm_mask(torch.full((1, 4), float("nan")), "2:4"), "NaN or Inf"),
    ("model with no linear layers / no spec", lambda: get_spec(nn.Sequential(nn.ReLU())),
     "no binding spec for model class Sequential"),
    ("Wanda without calibration", lambda: prune_model(_tiny_llama(), WandaPruner(), "2:4", progress=False),
     "needs calibration statistics"),
    ("SparseGPT block size not a multiple of M",
     lambda: SparseGPTPruner(blocksize=6).prune(torch.rand(4, 8), None, NMPattern(2, 4)), "blocksize"),
    ("channel groups not dividing d_in", lambda: LearnableCost(10, groups=4), "d_in=10 is not divisible by groups=4"),
    ("zero temperature", lambda: sinkhorn(torch.rand(3, 3), tau=0.0), "tau"),
    ("negative temperature schedule", lambda: TemperatureSchedule(start=-1.0), "temperatures must be > 0"),
    ("NaN assignment matrix", lambda: hungarian(torch.full((2, 2), float("nan"))), "NaN or Inf"),
    ("empty image set", lambda: top1(nn.Linear(4, 2), (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))),
     "empty"),
    ("eval windows longer than the text", lambda: eval_windows(torch.arange(100), 4, 30), "4 windows x 30 tokens"),
    ("training window longer than the text", lambda: train_windows(torch.arange(10), 2, 64),
     "fewer than one window of seq_len=64"),
    ("no windows to score", lambda: perplexity(nn.Identity(), torch.zeros(0, 8, dtype=torch.long), progress=False),
     "no windows"),
]


@pytest.mark.parametrize("what,call,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(what, call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value), f"{what}: {info.value}"


def test_the_table_is_long_enough():
    assert len(CASES) >= 15


def test_a_window_longer_than_the_model_context_stops_the_run(tmp_path):
    from conftest import TINY_LM, compose_cfg

    from permsparse.config import ConfigError
    from permsparse.run import train

    cfg = compose_cfg([*TINY_LM, "dataset.datamodule.seq_len=512"], tmp_path)
    with pytest.raises(ConfigError, match=r"dataset.datamodule.seq_len=512 is longer than the model's context of 256"):
        train(cfg)


def test_a_corrupt_checkpoint_is_named_before_anything_loads(tmp_path):
    from conftest import TINY_LM, compose_cfg

    from permsparse.config import ConfigError
    from permsparse.run import train

    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    cfg = compose_cfg([*TINY_LM, f"resume={run}"], tmp_path / "new")
    with pytest.raises(ConfigError, match="is unreadable \\(corrupt or truncated\\)"):
        train(cfg)
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(ConfigError, match="no checkpoint at"):
        train(cfg)


def test_an_empty_image_dataset_stops_the_run_before_the_model_loads(tmp_path, monkeypatch):
    from conftest import TINY_VIT, compose_cfg

    import permsparse.run as run
    from permsparse.config import ConfigError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(run, "build_model", no_model)
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        (root / split / "n01440764").mkdir(parents=True)  # class folders, but no images
    cfg = compose_cfg([*TINY_VIT, "dataset=imagenet", f"dataset.datamodule.root={root}"], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"train holds no images \(the dataset is empty\)"):
        run.train(cfg)
    (root / "train" / "n01440764" / "a.JPEG").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"val holds no images"):
        run.train(cfg)
    with pytest.raises(ConfigError, match="dataset.datamodule.root is not set"):
        run.train(compose_cfg([*TINY_VIT, "dataset=imagenet"], tmp_path / "out"))
