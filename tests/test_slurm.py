"""``hydra/launcher=submitit_slurm`` (the optional extra ``slurm``: hydra-submitit-launcher) composes with the run
config and carries the SLURM settings docs/planning.md documents. Nothing is submitted."""

import pytest
from conftest import TINY_LM, compose_cfg

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")

SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
         "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=600", "hydra.launcher.mem_gb=120",
         "hydra.launcher.cpus_per_task=8", "hydra.launcher.array_parallelism=4"]


def test_submitit_slurm_launcher_composes_with_the_settings_given():
    cfg = compose_cfg([*TINY_LM, "perm=learned", "trainer=ddp", *SLURM])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 2)
    assert (launcher.timeout_min, launcher.mem_gb, launcher.cpus_per_task) == (600, 120, 8)
    assert launcher.array_parallelism == 4  # a -m sweep is one job array, at most 4 of its jobs running at once
    assert launcher.submitit_folder.endswith(".submitit/%j")  # logs and pickles beside the sweep's outputs
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2  # the run config is untouched


def test_the_launcher_builds_from_the_config_without_submitting():
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    launcher = instantiate(compose_cfg([*TINY_LM, *SLURM]).hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)  # constructing it stores the parameters; launch() would submit
    assert launcher.params["partition"] == "gpu" and launcher.params["timeout_min"] == 600
