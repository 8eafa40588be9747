"""The paper's tables as experiments (conf/experiment/paper_*.yaml, docs/reproduction.md): every job of every sweep
composes to the table's settings, and offline a hub-only sweep stops before loading anything with one line."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT, compose_cfg
from omegaconf import DictConfig

from permsparse.config import ConfigError, validate_config

PAPER = sorted(p.stem for p in (CONF / "experiment").glob("paper_*.yaml"))


def _jobs(experiment: str) -> list[list[str]]:
    """The overrides of every job ``python train.py -m experiment=<experiment>`` launches (its sweeper params'
    cartesian product, parsed by Hydra's own override parser)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_cfg([f"experiment={experiment}"])
    params = cfg.hydra.sweeper.params or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [[f"experiment={experiment}", *combo] for combo in itertools.product(*axes)]


def _job_cfgs(experiment: str, tmp_path: Path) -> list[DictConfig]:
    return [compose_cfg(job, tmp_path) for job in _jobs(experiment)]


def test_there_is_one_experiment_per_paper_table():
    assert PAPER == ["paper_epochs", "paper_table1", "paper_table2", "paper_table3", "paper_table5_groups",
                     "paper_table6_pruners", "paper_table7_loss"]


def test_table3_runs_the_vision_language_model_with_ria_and_learned_on_mmmu(tmp_path):
    cfgs = _job_cfgs("paper_table3", tmp_path)
    assert sorted((c.pruner.name, c.perm.name) for c in cfgs) == [("ria", "ria"), ("wanda", "learned")]
    for c in cfgs:
        assert (c.model.name, c.sparsity.name, list(c.model.targets)) == ("qwen2_5_vl_3b", "2:4", ["language"])
        assert (list(c.eval.lm_eval.tasks), c.eval.lm_eval.apply_chat_template) == (["mmmu_val"], True)
        assert (c.perm.optimizer.lr, c.learning.max_epochs, c.trainer.accelerator) == (1e-4, 20, "gpu")


def test_table1_runs_both_vits_at_both_patterns_with_each_method_once(tmp_path):
    cfgs = _job_cfgs("paper_table1", tmp_path)
    got = sorted((c.model.name, c.sparsity.name, c.pruner.name, c.perm.name) for c in cfgs)
    methods = [("wanda", "greedy"), ("wanda", "ria"), ("ria", "ria"), ("wanda", "learned")]
    assert got == sorted((m, p, *meth) for m in ("vit_b", "vit_l") for p in ("2:4", "4:8") for meth in methods)
    for c in cfgs:
        assert (c.dataset.name, c.trainer.accelerator, c.perm.optimizer.lr, c.learning.max_epochs) == (
            "imagenet", "gpu", 0.1, 20)
        assert c.experiment_name == "paper_table1"
    weights = {c.model.name: c.model.load.name for c in cfgs}
    assert weights == {"vit_b": "vit_base_patch16_224.augreg_in1k",
                       "vit_l": "vit_large_patch14_clip_224.openai_ft_in1k"}


def test_table2_runs_both_llamas_with_every_method_and_the_seven_tasks(tmp_path):
    cfgs = _job_cfgs("paper_table2", tmp_path)
    got = sorted((c.model.name, c.pruner.name, c.perm.name) for c in cfgs)
    methods = [("magnitude", "none"), ("sparsegpt", "none"), ("wanda", "greedy"), ("wanda", "ria"), ("ria", "ria"),
               ("wanda", "learned")]
    assert got == sorted((m, *meth) for m in ("llama3_2_1b", "llama2_7b") for meth in methods)
    for c in cfgs:
        assert (c.dataset.name, c.dataset.datamodule.seq_len, c.sparsity.name) == ("c4_wikitext2", 4096, "2:4")
        assert (c.dataset.datamodule.corpus, c.dataset.datamodule.eval_corpus) == ("c4", "wikitext2")
        assert (c.perm.optimizer.lr, c.learning.max_epochs, c.calibration.samples) == (1e-4, 20, 128)
        assert list(c.eval.lm_eval.tasks) == ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa",
                                              "winogrande", "mmlu"]
        assert dict(c.eval.lm_eval.num_fewshot) == {"mmlu": 5}
    sparsegpt = next(c for c in cfgs if c.pruner.name == "sparsegpt")
    assert sparsegpt.calibration.sequential is True  # the pruner's published protocol survives the recipe


def test_the_ablations_vary_one_setting_each_on_their_model(tmp_path):
    groups = _job_cfgs("paper_table5_groups", tmp_path)
    assert [c.perm.method.groups for c in groups] == [1, 2, 4, 8, 16]
    epochs = _job_cfgs("paper_epochs", tmp_path)
    assert [c.learning.max_epochs for c in epochs] == [1, 2, 5, 10, 20]
    pruners = _job_cfgs("paper_table6_pruners", tmp_path)
    assert [c.pruner.name for c in pruners] == ["magnitude", "wanda", "ria", "sparsegpt"]
    loss = _job_cfgs("paper_table7_loss", tmp_path)
    assert [(c.perm.task_weight, c.perm.alpha) for c in loss] == [(1.0, 0.0), (0.0, 1e-5), (1.0, 1e-5)]
    for c in [*groups, *epochs, *pruners]:
        assert (c.model.name, c.perm.name, c.sparsity.name, c.perm.optimizer.lr) == ("llama2_7b", "learned", "2:4", 1e-4)
    for c in [*groups, *epochs, *loss]:
        assert c.pruner.name == "wanda"
    assert {c.model.name for c in loss} == {"llama3_2_1b"}
    for c in [*groups, *pruners, *loss]:  # only the epochs ablation changes the epochs
        assert c.learning.max_epochs == 20


def test_every_recipe_composes_into_its_pruner_and_permutation():
    expected = {"magnitude": ("magnitude", "none"), "sparsegpt": ("sparsegpt", "none"), "wanda": ("wanda", "none"),
                "cp_greedy": ("wanda", "greedy"), "cp_ria": ("wanda", "ria"), "ria": ("ria", "ria"),
                "learned": ("wanda", "learned"), "learned_ce_only": ("wanda", "learned"),
                "learned_distill_only": ("wanda", "learned")}
    assert sorted(expected) == sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
    for recipe, (pruner, perm) in expected.items():
        cfg = compose_cfg(["model=tiny_llama", f"+recipe={recipe}"], Path("/tmp/x"))
        assert (cfg.pruner.name, cfg.perm.name) == (pruner, perm), recipe
        validate_config(cfg)


@pytest.mark.parametrize("experiment", PAPER)
def test_offline_every_paper_job_stops_at_validation_naming_what_to_fetch(experiment, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for split in ("train", "val"):  # an ImageFolder, so the vision jobs get past the dataset root check
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
        (tmp_path / "imagenet" / split / "n01440764" / "x.JPEG").write_bytes(b"")
    for job in _jobs(experiment):
        cfg = compose_cfg(job, tmp_path)
        if cfg.dataset.name == "imagenet":
            with pytest.raises(ConfigError, match="dataset.datamodule.root is not set"):
                validate_config(cfg)
            cfg = compose_cfg([*job, f"dataset.datamodule.root={tmp_path / 'imagenet'}"], tmp_path)
            hint = "huggingface-cli download timm/.* or point model.load.checkpoint_path="
        else:
            hint = f"huggingface-cli download {cfg.model.load.name_or_path}.* or point model.load.name_or_path="
        with pytest.raises(ConfigError, match=f"needs .* from the Hugging Face Hub, which is offline here.*{hint}"):
            validate_config(cfg)


def test_offline_a_local_model_folder_passes_and_a_missing_one_is_named(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cfg = compose_cfg(["experiment=paper_table6_pruners", f"model.load.name_or_path={tmp_path}"], tmp_path)
    validate_config(cfg)  # a local folder needs no hub
    cfg = compose_cfg(["experiment=paper_table6_pruners", f"model.load.name_or_path={tmp_path / 'no'}"], tmp_path)
    with pytest.raises(ConfigError, match=f"model.load.name_or_path={tmp_path / 'no'}: no such folder"):
        validate_config(cfg)


def test_online_the_hub_model_is_left_to_the_loader(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cfg = compose_cfg(["experiment=paper_table5_groups"], Path("/tmp/x"))
    validate_config(cfg)  # nothing cached, but the hub may be reachable: no error before the loader runs


def _train_offline(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    return subprocess.run([sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_the_table2_sweep_offline_says_what_to_download_in_one_line(tmp_path):
    proc = _train_offline(tmp_path, "experiment=paper_table2")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: model=llama3_2_1b needs meta-llama/Llama-3.2-1B from the Hugging Face Hub")
    assert "huggingface-cli download meta-llama/Llama-3.2-1B" in lines[0]
    assert not list((tmp_path / "sweep").rglob("results.json"))
